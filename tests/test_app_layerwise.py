"""A model larger than memory in the app: a local folder opened layer by layer (``kcm_core.streamed.passes``).

The parts (R2, activation statistics, one layer's rows) read one layer at a time equal the in-memory
ones; the app opens such a folder (asked, or by itself when its weights exceed the memory available),
every page runs without ever running the whole model, the Prune page's counts equal the in-memory
plan's, and the export writes the pruned model layer by layer, the same as ``prune --stream``. Tiny
LLaMA and BERT models saved to temporary folders; nothing is downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from conftest import app_runner, build_tiny_model, make_batches, tiny_lm_and_documents, use_tiny_lm
from kcm_app import resources, state
from kcm_app.engine import evaluations
from kcm_app.sources import ModelChoice, env_defaults, model_key
from kcm_app.testing import finish_background
from kcm_core import scores as S
from kcm_core.activations import collect_stats
from kcm_core.hull import HullConfig
from kcm_core.streamed.skeleton import Skeleton
from kcm_core.pipeline import PruneConfig, compute_scores
from kcm_core.streamed.passes import layer_rows_streamed, prune_streamed, r2_streamed, stats_streamed

APP = str(Path(__file__).resolve().parents[1] / "app.py")
TIMEOUT = 180


# --------------------------------------------------------------------------- the parts, layer by layer

@pytest.mark.parametrize("family,task", [("llama", "causal-lm"), ("bert", "classification")])
def test_parts_read_layer_by_layer_equal_the_in_memory_ones(tmp_path, family, task):
    model = build_tiny_model(family, task, layers=3)
    model.save_pretrained(tmp_path / "model")
    batches = make_batches(model, labels=False, n_batches=2)
    sk = Skeleton(tmp_path / "model", torch.device("cpu"))
    hull = HullConfig()
    scores, fits = r2_streamed(sk, hull)
    ref_scores, ref_fits = S.r2(model, hull)
    assert len(scores) == 3
    for a, b, fa, fb in zip(scores, ref_scores, fits, ref_fits):
        assert torch.allclose(a, b, atol=1e-6) and fa.iterations == fb.iterations
    stats, ref = stats_streamed(sk, batches), collect_stats(model, batches)
    assert stats.tokens == ref.tokens and stats.sequences == ref.sequences
    for name in ("mean", "mean_abs", "rms", "var"):
        for a, b in zip(getattr(stats, name), getattr(ref, name)):
            assert torch.allclose(a, b, atol=1e-5), name
    from kcm_core.arch import ffn_blocks
    for index in range(3):
        assert torch.equal(layer_rows_streamed(sk, index), ffn_blocks(model)[index].down_rows().detach().float())
    with pytest.raises(ValueError, match="layer must be in"):
        layer_rows_streamed(sk, 3)
    # every layer is emptied again afterwards: the skeleton holds no weights
    assert all(p.device.type == "meta" for p in sk.layers.parameters())


def test_prune_streamed_with_scores_given_equals_scoring_there(tmp_path):
    model = build_tiny_model("llama", "causal-lm", layers=3)
    model.save_pretrained(tmp_path / "model")
    batches = make_batches(model, labels=False, n_batches=2)
    config = PruneConfig(method="kcm", budget=0.8, scale_samples=4)
    scores = compute_scores(model, config, batches)
    given = prune_streamed(tmp_path / "model", config, batches, tmp_path / "given", scores=scores)
    scored = prune_streamed(tmp_path / "model", config, batches, tmp_path / "scored")
    assert [l.keep_idx for l in given.plan.layers] == [l.keep_idx for l in scored.plan.layers]
    for a, b in zip(given.plan.layers, scored.plan.layers):
        assert torch.allclose(torch.tensor(a.scales), torch.tensor(b.scales), atol=1e-5)
    with pytest.raises(ValueError, match="'kcm''s for 3 layers, not 'd2'"):
        prune_streamed(tmp_path / "model", PruneConfig(method="d2", budget=0.8), batches, tmp_path / "x",
                       scores=scores)
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- choices

def test_layer_by_layer_is_a_choice_for_local_folders_only():
    assert env_defaults({"KCM_APP_MODEL": "/m", "KCM_APP_STREAM": "1"})[0] == ModelChoice("folder", "/m", stream=True)
    assert env_defaults({"KCM_APP_MODEL": "/m"})[0].stream is False
    with pytest.raises(ValueError, match="only a local folder opens layer by layer"):
        ModelChoice("hub", "bert-base-uncased", stream=True)
    assert model_key(ModelChoice("folder", "/m", stream=True)) != model_key(ModelChoice("folder", "/m"))
    assert ModelChoice("folder", "/m", stream=True).describe().endswith("(layer by layer)")


# --------------------------------------------------------------------------- the app

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return tiny_lm_and_documents(tmp_path_factory.mktemp("tiny-layerwise"))


@pytest.fixture
def app(tiny_lm, monkeypatch, tmp_path):
    """AppTest on the tiny LM, layer by layer; anything that runs the whole model fails the test."""
    use_tiny_lm(monkeypatch, tmp_path, tiny_lm, stream=True)

    def whole_model(*args, **kwargs):
        raise AssertionError("the whole model was run on a model opened layer by layer")
    for name in ("evaluate_lm", "evaluate_classifier", "teacher_targets", "slice_model"):
        monkeypatch.setattr(evaluations, name, whole_model)

    yield app_runner(TIMEOUT, errors=True)
    finish_background()


def infos(at: AppTest) -> str:
    return " ".join(i.value for i in at.info)


def test_every_page_opens_a_model_layer_by_layer_without_running_it_whole(app, tiny_lm):
    at = app()
    ws = at.session_state[state.WORKSPACE]
    assert ws.streamed and ws.stream_dir == str(tiny_lm[0]) and ws.is_lm
    assert all(p.device.type == "meta" for p in ws.model.parameters())      # nothing was loaded whole
    assert "opened layer by layer" in infos(at) and "perplexity" in infos(at)
    assert at.checkbox(key=state.MODEL_STREAM).value is True
    assert not at.metric or all(m.label != "Perplexity (unpruned)" for m in at.metric)
    cost = app("pages/2_cost.py")
    assert "timing the blocks" in infos(cost)
    assert [b for b in cost.button if b.key == "cost_measure"][0].disabled
    scores = app("pages/3_scores.py")
    assert [df.value for df in scores.dataframe]          # the top/bottom tables are drawn
    assert scores.selectbox(key="scores_column").value == "r2d2"
    hull = app("pages/4_hull.py")
    assert any("iterations" in c.value for c in hull.caption)
    prune = app("pages/5_prune.py")
    labels = [m.label for m in prune.metric]
    assert labels == ["Relative FLOPs", "Parameters", "Neurons pruned", "Estimated speedup"]
    assert "method comparison" in infos(prune)
    assert "kcm-labels" not in prune.selectbox(key=state.W_METHOD).options


def test_the_prune_page_counts_the_in_memory_plan_and_the_export_writes_it(app, tiny_lm, tmp_path):
    """The streamed workspace's KCM scores and plan equal the in-memory workspace's; the export's
    folder holds that plan and loads."""
    model_dir, docs = tiny_lm
    at = app("pages/5_prune.py", budget="0.8", method="kcm")     # the paper's KCM, not the LM default
    ws = at.session_state[state.WORKSPACE]
    config = PruneConfig(method="kcm", budget=0.8, scale_samples=evaluations.scale_samples(ws), seed=0)
    store = resources.store("results")
    from kcm_app import engine
    streamed_plan = engine.readout(ws, engine.method_scores(ws, config, store), config, store).plan
    from kcm_core.models import load_model
    model, _ = load_model(str(model_dir))
    reference = compute_scores(model, config, list(ws.unlabeled))
    from kcm_core.pipeline import make_plan
    in_memory = make_plan(model, reference, config, ws.seq_len)
    assert [l.keep_idx for l in streamed_plan.layers] == [l.keep_idx for l in in_memory.layers]
    assert at.metric[2].value == f"{1 - in_memory.total_kept / sum(in_memory.widths):.1%}"

    out = tmp_path / "exported"
    export = app("pages/6_export.py", budget="0.8", method="kcm")
    export.text_input(key="export_dir").set_value(str(out)).run()
    export.button(key="export_go").click().run()
    assert not export.exception and not export.error, [e.value for e in export.error]
    assert any("Written layer by layer" in s.value for s in export.success)
    expected = prune_streamed(model_dir, config, list(ws.unlabeled), tmp_path / "cli-like")
    written = json.loads((out / "kcm_plan.json").read_text())
    assert [l["keep_idx"] for l in written["layers"]] == [list(l.keep_idx) for l in expected.plan.layers]
    report = json.loads((out / "report.json").read_text())
    assert report["evaluation"] is None and report["method"]["name"] == "kcm"
    assert report["neurons"]["kept_per_layer"] == list(expected.plan.kept_counts)
    from kcm_core.export import load_pruned
    loaded = load_pruned(out)
    assert [b.width for b in __import__("kcm_core.arch", fromlist=["ffn_blocks"]).ffn_blocks(loaded)] == \
        list(expected.plan.kept_counts)
    # an existing folder is refused in the page's words, and left as it was
    before = sorted(p.name for p in out.iterdir())
    again = app("pages/6_export.py", budget="0.8")
    again.text_input(key="export_dir").set_value(str(out)).run()
    again.button(key="export_go").click().run()
    assert any("tick Overwrite" in e.value for e in again.error)
    assert sorted(p.name for p in out.iterdir()) == before


def test_a_folder_larger_than_the_memory_available_opens_layer_by_layer_by_itself(tiny_lm, monkeypatch, tmp_path):
    import psutil
    model_dir, docs = tiny_lm
    monkeypatch.setenv("KCM_APP_MODEL", str(model_dir))
    monkeypatch.setenv("KCM_APP_DATA", str(docs))
    monkeypatch.setenv("KCM_APP_BLOCK_SIZE", "16")
    monkeypatch.delenv("KCM_APP_STREAM", raising=False)
    monkeypatch.setenv("KCM_CACHE_DIR", str(tmp_path / "cache"))
    choice = ModelChoice("folder", str(model_dir))
    assert resources.layerwise_reason(choice) is None                 # it fits
    real = psutil.virtual_memory()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: real._replace(available=1000))
    assert resources.layerwise_reason(choice).endswith("this machine has 0.0 GiB of memory available")
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    try:
        assert not at.exception, [e.value for e in at.exception]
        assert at.session_state[state.WORKSPACE].streamed
        assert any("layer by layer" in w.value and "memory available" in w.value for w in at.warning)
    finally:
        finish_background()


def test_a_classifier_layer_by_layer_offers_label_free_methods_and_kcm_scores(tmp_path, monkeypatch):
    """A labeled CSV on a tiny BERT classifier: no accuracy, no label-using method, KCM's score parts
    only on the Scores page (equal to the in-memory ones); nothing runs the whole model."""
    from app_tiny import write_tiny
    model_dir, csv = write_tiny(tmp_path / "tiny")
    monkeypatch.setenv("KCM_APP_MODEL", str(model_dir))
    monkeypatch.setenv("KCM_APP_DATA", str(csv))
    monkeypatch.setenv("KCM_APP_STREAM", "1")
    monkeypatch.setenv("KCM_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("evaluate_classifier", "teacher_targets", "slice_model"):
        monkeypatch.setattr(evaluations, name, lambda *a, **k: pytest.fail("the whole model was run"))
    try:
        at = AppTest.from_file(APP, default_timeout=TIMEOUT)
        at.run()
        assert not at.exception and not at.error, [e.value for e in at.exception] + [e.value for e in at.error]
        ws = at.session_state[state.WORKSPACE]
        assert ws.streamed and ws.has_labels and not ws.is_lm
        assert "accuracy" in infos(at)
        prune = at.switch_page("pages/5_prune.py").run()
        options = prune.selectbox(key=state.W_METHOD).options
        assert "KCM (R2D2)" in options and not any("labels" in o for o in options)
        scores = at.switch_page("pages/3_scores.py").run()
        assert not scores.exception and not scores.error
        assert scores.selectbox(key="scores_column").options == ["R2D2 (KCM)", "R2 (kernel hull, weights)",
                                                                 "D2 (activations)", "Weight magnitude",
                                                                 "Output magnitude", "Fisher (labels)"]
        assert any("baselines are left out" in c.value for c in scores.caption)
        from kcm_app import engine
        from kcm_core.models import load_model
        model, _ = load_model(str(model_dir))
        config = PruneConfig(method="kcm")
        store = resources.store("results")
        r2, _ = engine.r2_fits(ws, config, store)
        stats = engine.neuron_stats(ws, store)
        for a, b in zip(r2, S.r2(model, config.hull)[0]):
            assert torch.allclose(a, b, atol=1e-6)
        for a, b in zip(stats.mean_abs, collect_stats(model, list(ws.unlabeled)).mean_abs):
            assert torch.allclose(a, b, atol=1e-5)
        with pytest.raises(ValueError, match="opened layer by layer"):
            engine.gradient_scores(ws, PruneConfig(method="mask-tuning"), store)
    finally:
        finish_background()

"""The streamed mode (``kcm_core.streamed.passes``): one layer at a time from the safetensors files, with the
same plan, scales and outputs (1e-5) as the in-memory path on every family of the adapter table; the
folder it writes loads like the in-memory export; clear refusals; nothing half-written. Also
``load_model`` with accelerate's ``device_map``."""
from __future__ import annotations

import hashlib
import json
import random

import pytest
import torch
import transformers as T

from conftest import LM_WORDS, build_tiny_model, make_batches, save_tiny_lm
from kcm_core import cli
from kcm_core.streamed import passes as stream, skeleton as layerwise
from kcm_core.arch import FAMILIES, ffn_blocks, model_shape
from kcm_core.flops import flops_floor, relative_flops
from kcm_core.methods import DEFAULT_LM_METHOD
from kcm_core.export import load_pruned
from kcm_core.models import load_model
from kcm_core.pipeline import PruneConfig, prune, resolve_seq_len
from kcm_core.repair import RepairConfig
from kcm_core.streamed.passes import prune_streamed

# One representative per family row of kcm_core.arch.FAMILIES, with the task it is pruned for.
STREAMED = {"bert": "classification", "distilbert": "classification", "gpt2": "causal-lm",
            "llama": "causal-lm", "mistral": "causal-lm", "qwen2": "causal-lm", "vit": "classification",
            "dinov2": "classification"}


def _saved(tmp_path, family, task, **kw):
    model = build_tiny_model(family, task, layers=3, **kw)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    return model, folder


def _outputs(model, batches):
    with torch.no_grad():
        return [model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches]


def _assert_same(reference, streamed, batches, loaded):
    assert [l.keep_idx for l in streamed.plan.layers] == [l.keep_idx for l in reference.plan.layers]
    for a, b in zip(reference.plan.layers, streamed.plan.layers):
        assert (a.scales is None) == (b.scales is None)
        if a.scales is not None:
            assert torch.allclose(torch.tensor(a.scales), torch.tensor(b.scales), atol=1e-5, rtol=0)
        assert (a.bias_shift is None) == (b.bias_shift is None)
        if a.bias_shift is not None:
            assert torch.allclose(torch.tensor(a.bias_shift), torch.tensor(b.bias_shift), atol=1e-5, rtol=0)
    for key in ("k", "scaled_layers", "scaling_stopped_at", "seq_len"):
        assert getattr(streamed.plan.info, key) == getattr(reference.plan.info, key)
    for x, y in zip(_outputs(reference.model, batches), _outputs(loaded, batches)):
        assert (x - y).abs().max() <= 1e-5


def test_every_family_of_the_adapter_table_is_covered_or_refused():
    assert {f.name for f in FAMILIES} == set(STREAMED)


@pytest.mark.parametrize("family", sorted(STREAMED))
def test_streamed_kcm_equals_in_memory_on_every_family(tmp_path, family):
    model, folder = _saved(tmp_path, family, STREAMED[family])
    batches = make_batches(model, labels=False, n_batches=3)
    config = PruneConfig(method="kcm", budget=0.8, scale_samples=8)
    reference = prune(model, config, batches)
    streamed = prune_streamed(folder, config, batches, tmp_path / "out")
    assert streamed.plan.info.scaled_layers == 3 and streamed.max_abs_diff <= 1e-5
    _assert_same(reference, streamed, batches, load_pruned(tmp_path / "out"))
    written = json.loads((tmp_path / "out" / "kcm_plan.json").read_text())
    assert [l["keep_idx"] for l in written["layers"]] == [list(l.keep_idx) for l in reference.plan.layers]


@pytest.mark.parametrize("method", ["flap", "wanda-sp", "random", "weight-magnitude-scale", "d2", "r2",
                                   "output-magnitude", "fluct-refit-curve", "weight-magnitude/curve"])
def test_streamed_label_free_methods_equal_in_memory(tmp_path, method):
    """Every label-free method, and the curve allocation (its error curves are a second run of each
    layer in the streamed mode, with the method's statistics or, for weight magnitude, without any)."""
    method, _, allocation = method.partition("/")
    model, folder = _saved(tmp_path, "llama", "causal-lm")
    batches = make_batches(model, labels=False, n_batches=2)
    config = PruneConfig(method=method, budget=0.8, scale_samples=4, seed=3, allocation=allocation or "auto")
    _assert_same(prune(model, config, batches), prune_streamed(folder, config, batches, tmp_path / "out"),
                 batches, load_pruned(tmp_path / "out"))


@pytest.mark.parametrize("method", ["random", "weight-magnitude"])
def test_a_bias_on_scores_without_statistics_reads_the_whole_sample_in_memory_and_streamed(tmp_path, method):
    """FLAP's bias needs every neuron's mean input; a method whose scores carry none gets it from the
    whole scoring sample (as the app's store and the methods with statistics do), not the repair sample."""
    from kcm_core.activations import collect_stats
    from kcm_core.compensation import compensate
    from kcm_core.pipeline import make_plan, compute_scores
    model, folder = _saved(tmp_path, "llama", "causal-lm")
    batches = make_batches(model, labels=False, n_batches=3)
    config = PruneConfig(method=method, budget=0.8, scale_samples=2, seed=3, repair=RepairConfig(kind="bias"))
    reference = prune(model, config, batches)
    scored = compute_scores(model, config, batches)
    plan = make_plan(model, scored, config, resolve_seq_len(model_shape(model.config), batches, None))
    whole = compensate(model, plan, collect_stats(model, batches).mean)
    part = compensate(model, plan, collect_stats(model, config.repair_sample(batches)).mean)
    shifts = lambda p: torch.cat([torch.tensor(l.bias_shift) for l in p.layers])
    assert torch.allclose(shifts(reference.plan), shifts(whole), atol=1e-6)
    assert not torch.allclose(shifts(whole), shifts(part), atol=1e-4)      # the two samples differ here
    _assert_same(reference, prune_streamed(folder, config, batches, tmp_path / "out"), batches,
                 load_pruned(tmp_path / "out"))


@pytest.mark.parametrize("family,task", [("vit", "classification"), ("llama", "causal-lm")])
def test_streamed_overwrite_never_replaces_a_folder_that_is_not_an_export(tmp_path, family, task):
    """--stream --overwrite writes through the same guard as the in-memory export: a user's folder
    without our markers is refused, and nothing in it or beside it changes."""
    model, folder = _saved(tmp_path, family, task)
    batches = make_batches(model, labels=False, n_batches=2)
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "important.txt").write_text("only copy")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(ValueError, match="is not an earlier export"):
        prune_streamed(folder, PruneConfig(method="d2", budget=0.8, scale_samples=4), batches, victim,
                       overwrite=True)
    assert [p.name for p in victim.iterdir()] == ["important.txt"]
    assert (victim / "important.txt").read_text() == "only copy"
    assert sorted(p.name for p in tmp_path.iterdir()) == before          # no half-written folder beside it


def test_uniform_widths_load_with_stock_transformers_and_chunked_reads_change_nothing(tmp_path, monkeypatch):
    model, folder = _saved(tmp_path, "gpt2", "causal-lm")
    batches = make_batches(model, labels=False)
    config = PruneConfig(method="kcm", budget=0.8, uniform=True, scale_samples=8)
    monkeypatch.setattr(layerwise, "READ_CHUNK_BYTES", 96)       # every matrix read in several pieces
    streamed = prune_streamed(folder, config, batches, tmp_path / "out")
    assert streamed.loader == "transformers"
    stock = T.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert stock.config.n_inner == streamed.plan.kept_counts[0]
    _assert_same(prune(model, config, batches), streamed, batches, stock)
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"config.json", "model.safetensors.index.json", "kcm_plan.json", "export.json",
            "report.md"} <= names
    assert json.loads((tmp_path / "out" / "export.json").read_text())["verified_streamed"] is True


def _tensor_names(folder) -> set[str]:
    from safetensors import safe_open
    names = set()
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            names.update(f.keys())
    return names


# family -> (stock class, a renamed tensor under its saved name). DINOv2's budget keeps 32 of 64 neurons
# per layer: its int mlp_ratio states only multiples of the hidden size (32), as a stock folder needs.
STOCK_NAMES = {"vit": (T.ViTForImageClassification, "vit.encoder.layer.0.intermediate.dense.weight"),
               "dinov2": (T.Dinov2ForImageClassification, "dinov2.encoder.layer.0.attention.attention.query.weight")}


@pytest.mark.parametrize("family", sorted(STOCK_NAMES))
def test_a_uniform_image_model_is_written_under_the_stock_names_and_loads_with_the_stock_class(tmp_path, family):
    """transformers 5 renames ViT's and DINOv2's tensors on load (``encoder.layer.N.intermediate.dense``
    -> ``layers.N.mlp.fc1``, ``attention.attention.query`` -> ``attention.q_proj``) and back on save: the
    streamed folder holds the names stock save_pretrained writes, and the stock class loads it with the
    in-memory model's logits."""
    cls, saved_name = STOCK_NAMES[family]
    model, folder = _saved(tmp_path, family, "classification")
    batches = make_batches(model, labels=False, n_batches=3)
    shape = model_shape(model.config)
    budget = 0.8 if family == "vit" else relative_flops(shape, shape.image_tokens, [32] * 3) + 1e-9
    config = PruneConfig(method="kcm", budget=budget, uniform=True, scale_samples=8)
    reference = prune(model, config, batches)
    streamed = prune_streamed(folder, config, batches, tmp_path / "out")
    assert streamed.loader == "transformers" and streamed.plan.info.scaled_layers == 3
    reference.model.save_pretrained(tmp_path / "stock")
    written = _tensor_names(tmp_path / "out")
    assert written == _tensor_names(tmp_path / "stock")
    assert saved_name in written
    stock = cls.from_pretrained(tmp_path / "out").eval()
    assert [b.width for b in ffn_blocks(stock)] == streamed.plan.kept_counts
    assert streamed.plan.kept_counts[0] < shape.ffn_width[0]
    _assert_same(reference, streamed, batches, stock)


@pytest.mark.parametrize("family", ["gpt2", "bert"])
def test_layers_emptied_by_the_budget_stream_like_in_memory(tmp_path, family):
    model, folder = _saved(tmp_path, family, STREAMED[family])
    batches = make_batches(model, labels=False)
    seq_len = resolve_seq_len(model_shape(model.config), batches, None)
    config = PruneConfig(method="weight-magnitude", budget=flops_floor(model_shape(model.config), seq_len) + 0.004)
    reference = prune(model, config, batches)
    assert 0 in reference.plan.kept_counts                     # GPT-2: an emptied Conv1D layer
    streamed = prune_streamed(folder, config, batches, tmp_path / "out")
    assert streamed.loader == "kcm_core.load_pruned"
    _assert_same(reference, streamed, batches, load_pruned(tmp_path / "out"))


def test_the_source_folder_is_left_as_it_was(tmp_path):
    model, folder = _saved(tmp_path, "qwen2", "causal-lm")
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}
    prune_streamed(folder, PruneConfig(budget=0.8, scale_samples=4), make_batches(model, labels=False),
                   tmp_path / "out")
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()} == before


@pytest.mark.parametrize("method,message", [("mask-tuning", "needs gradients through the whole model"),
                                            ("kcm-labels", "needs gradients through the whole model")])
def test_label_methods_are_refused(tmp_path, method, message):
    model, folder = _saved(tmp_path, "llama", "causal-lm")
    with pytest.raises(ValueError, match=message):
        prune_streamed(folder, PruneConfig(method=method, budget=0.8), make_batches(model), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_targets_and_models_are_refused_before_any_work(tmp_path):
    model, folder = _saved(tmp_path, "llama", "causal-lm")
    batches = make_batches(model, labels=False)
    config = PruneConfig(budget=0.8)
    with pytest.raises(ValueError, match="which this run reads"):
        prune_streamed(folder, config, batches, folder / "inside")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="already exists"):
        prune_streamed(folder, config, batches, tmp_path / "taken")
    with pytest.raises(ValueError, match="needs unlabeled data"):
        prune_streamed(folder, config, [], tmp_path / "out")
    from safetensors.torch import load_file, save_file
    vit = build_tiny_model("vit")
    vit.save_pretrained(tmp_path / "vit")
    tensors = load_file(tmp_path / "vit" / "model.safetensors")
    del tensors["vit.encoder.layer.1.output.dense.weight"]          # loaded as vit.layers.1.mlp.fc2.weight
    save_file(tensors, tmp_path / "vit" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights that ViTForImageClassification needs "
                                         r"\(vit\.layers\.1\.mlp\.fc2\.weight\).*restore the config.json"):
        prune_streamed(tmp_path / "vit", config, make_batches(vit, labels=False), tmp_path / "out")
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="damaged or incomplete"):
        prune_streamed(folder, config, batches, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_tensors_transformers_splits_on_load_are_refused_by_name():
    """DINOv2's old fused SwiGLU tensor ``mlp.weights_in`` is chunked into gate and up on load (a
    converter, not a renaming): the streamed reader cannot do that one tensor at a time."""
    model = build_tiny_model("dinov2")
    keys = ["dinov2.encoder.layer.0.attention.attention.query.weight", "dinov2.encoder.layer.0.mlp.weights_in.weight"]
    assert layerwise.loaded_names(model, keys[:1]) == {"dinov2.encoder.layer.0.attention.q_proj.weight": keys[0]}
    with pytest.raises(ValueError, match=r"converts the tensor dinov2\.encoder\.layer\.0\.mlp\.weights_in\.weight "
                                         r"on load.*prune it without --stream"):
        layerwise.loaded_names(model, keys, "folder")


def test_overwrite_replaces_an_earlier_export_only(tmp_path):
    model, folder = _saved(tmp_path, "llama", "causal-lm")
    batches = make_batches(model, labels=False)
    config = PruneConfig(method="d2", budget=0.8)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not an earlier export"):
        prune_streamed(folder, config, batches, mine, overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me" and sorted(mine.iterdir()) == [mine / "notes.txt"]
    out = tmp_path / "out"
    first = prune_streamed(folder, config, batches, out)
    again = prune_streamed(folder, config, batches, out, overwrite=True)
    assert again.plan.kept_counts == first.plan.kept_counts and (out / "config.json").is_file()


def test_a_failed_check_of_the_written_files_leaves_nothing(tmp_path, monkeypatch):
    model, folder = _saved(tmp_path, "llama", "causal-lm")
    real = stream._reload_output
    monkeypatch.setattr(stream, "_reload_output", lambda *a: real(*a) + 1.0)
    with pytest.raises(ValueError, match="differs from the layers sliced in memory"):
        prune_streamed(folder, PruneConfig(budget=0.8, scale_samples=4), make_batches(model, labels=False),
                       tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("out")] == []


def test_prune_stream_on_the_command_line_writes_the_in_memory_plan(export_reload, tmp_path, capsys):
    rng = random.Random(0)
    (tmp_path / "docs.txt").write_text(
        "\n".join(" ".join(rng.choice(LM_WORDS) for _ in range(30)) for _ in range(40)) + "\n")
    model_dir = save_tiny_lm(tmp_path / "lm", "llama")
    common = ["prune", "--model", str(model_dir), "--data", str(tmp_path / "docs.txt"), "--flops", "0.9",
              "--block-size", "16", "--samples", "8", "--eval-blocks", "4"]
    assert cli.main(common + ["--out", str(tmp_path / "memory")]) == 0
    capsys.readouterr()
    assert cli.main(common + ["--out", str(tmp_path / "streamed"), "--stream"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["export"]["streamed"] is True and "not evaluated" in report["evaluation_note"]
    plans = [json.loads((tmp_path / name / "kcm_plan.json").read_text()) for name in ("memory", "streamed")]
    assert [l["keep_idx"] for l in plans[0]["layers"]] == [l["keep_idx"] for l in plans[1]["layers"]]
    assert plans[0]["method"] == plans[1]["method"] == DEFAULT_LM_METHOD     # the language-model default
    assert plans[0]["info"]["allocation"] == plans[1]["info"]["allocation"] == "curve"
    for a, b in zip(plans[0]["layers"], plans[1]["layers"]):
        assert (a["bias_shift"] is None) == (b["bias_shift"] is None)
        if a["bias_shift"] is not None:
            assert torch.allclose(torch.tensor(a["bias_shift"]), torch.tensor(b["bias_shift"]), atol=1e-5, rtol=0)
    ids = torch.randint(5, len(LM_WORDS), (2, 12), generator=torch.Generator().manual_seed(0))
    memory, streamed = load_model(tmp_path / "memory")[0], load_model(tmp_path / "streamed")[0]
    with torch.no_grad():
        assert (memory(input_ids=ids).logits - streamed(input_ids=ids).logits).abs().max() <= 1e-5
    assert cli.main(common + ["--out", str(tmp_path / "x"), "--stream", "--format", "hf,onnx"]) == 2
    assert "--stream writes the hf format only" in capsys.readouterr().err


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
def test_load_model_with_a_device_map_prunes_like_a_plain_load(tmp_path, device_map):
    folder = save_tiny_lm(tmp_path / "lm", "llama")
    plain, _ = load_model(folder)
    mapped, _ = load_model(folder, device_map=device_map)
    gen = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(5, plain.config.vocab_size, (2, 12), generator=gen),
                "attention_mask": torch.ones(2, 12, dtype=torch.long)} for _ in range(2)]
    config = PruneConfig(budget=0.8, scale_samples=4)
    a, b = prune(plain, config, batches), prune(mapped, config, batches)
    assert a.plan.layers == b.plan.layers
    assert _outputs(a.model, batches)[0].sub(_outputs(b.model, batches)[0]).abs().max() <= 1e-6


def test_load_model_refuses_weights_offloaded_out_of_memory(tmp_path):
    folder = save_tiny_lm(tmp_path / "lm", "llama")
    with pytest.raises(ValueError, match="prune --stream"):
        load_model(folder, device_map="auto", max_memory={"cpu": "40KB"}, offload_folder=str(tmp_path / "off"))


def test_streamed_error_curves_equal_in_memory(tmp_path):
    """The curve allocation's curves, computed one layer at a time from the checkpoint, are the
    in-memory ones (whether or not the method's statistics ran the layer first)."""
    from kcm_core.pipeline import compute_scores
    from kcm_core.streamed.passes import score_streamed
    from kcm_core.streamed.skeleton import Skeleton
    model, folder = _saved(tmp_path, "llama", "causal-lm")
    batches = make_batches(model, labels=False, n_batches=2)
    for config in (PruneConfig(method="fluct-refit-curve", budget=0.8),
                   PruneConfig(method="weight-magnitude", budget=0.8, allocation="curve")):
        memory = compute_scores(model, config, batches).curves
        streamed = score_streamed(Skeleton(folder, torch.device("cpu")), config, batches).curves
        assert len(streamed) == len(memory) == model.config.num_hidden_layers
        for a, b in zip(memory, streamed):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6 * float(a[0]))

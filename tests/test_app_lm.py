"""The app on a causal language model, every page through the entry point (``AppTest``): a tiny
LLaMA (``LlamaForCausalLM``, hidden 32, gated MLP 37, 2 layers, 4 heads / 2 KV heads) with a WordPiece
tokenizer and a small TXT of documents, in 16-token blocks (``KCM_APP_BLOCK_SIZE``). The real LM demo
is never loaded here.
"""
from __future__ import annotations

import json

import pytest
from streamlit.testing.v1 import AppTest

from conftest import LM_WORDS, app_runner, same_state, state_snapshot, tiny_lm_and_documents, use_tiny_lm
from kcm_app import resources, state
from kcm_app.testing import finish_background
from kcm_app.sources import LM_CALIBRATION_BLOCKS, ModelChoice, env_defaults
from kcm_core.methods import DEFAULT_LM_METHOD

PAGES = ["pages/1_model.py", "pages/2_cost.py", "pages/3_scores.py", "pages/4_hull.py",
         "pages/5_prune.py", "pages/6_export.py"]
TIMEOUT = 180
WORDS = LM_WORDS


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return tiny_lm_and_documents(tmp_path_factory.mktemp("tiny-app-lm"))


@pytest.fixture
def app(tiny_lm, monkeypatch, tmp_path):
    use_tiny_lm(monkeypatch, tmp_path, tiny_lm)
    yield app_runner(TIMEOUT, errors=True)
    finish_background()          # no background thread outlives the test's cache folder


def metric(at: AppTest, label: str) -> str:
    found = [m.value for m in at.metric if m.label == label]
    assert found, f"no metric {label!r}; have {[m.label for m in at.metric]}"
    return found[0]


def test_lm_demo_is_offered_and_named_by_the_environment():
    model, data = env_defaults({"KCM_APP_MODEL": "demo-lm"})
    assert (model, data.kind) == (ModelChoice("demo-lm"), "demo-lm")
    assert env_defaults({"KCM_APP_MODEL": "demo"})[0] == ModelChoice("demo")
    assert state.demo_data_for("demo-lm", "demo") == "demo-lm"
    assert state.demo_data_for("demo", "demo-lm") == "demo"
    assert state.demo_data_for("folder", "file") == "file"


def test_every_page_runs_on_a_language_model(app):
    at = app()
    ws = at.session_state[state.WORKSPACE]
    assert ws.is_lm and ws.seq_len == 16 and not ws.has_labels
    assert ws.info.sample == LM_CALIBRATION_BLOCKS
    assert all(b["input_ids"].shape[1] == 16 for b in ws.unlabeled + ws.eval_batches)
    assert float(metric(at, "Perplexity (unpruned)").replace(",", "")) > 1
    assert at.number_input(key=state.LM_BLOCKS).value == LM_CALIBRATION_BLOCKS
    assert at.select_slider(key=state.BLOCK_SIZE).value == 16
    table = at.table[0].value.to_dict()["value"]
    assert table["key/value heads per layer"] == "2" and table["layers"] == "2"
    for page in PAGES[1:]:
        at.switch_page(page).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert not at.error, (page, [e.value for e in at.error])
    at.switch_page("pages/2_cost.py").run()
    assert at.select_slider(key="cost_seq_len").label.startswith("Block length")


def test_prune_page_reads_out_perplexity_and_generates_both_continuations(app):
    at = app("pages/5_prune.py", budget="0.9", method="kcm")
    ws = at.session_state[state.WORKSPACE]
    snapshot = state_snapshot(ws.model)
    assert "mask-tuning" not in at.selectbox(key=state.W_METHOD).options   # label-using: not for an LM
    ppl = float(metric(at, "Perplexity").replace(",", ""))
    assert ppl > 1
    assert metric(at, "Agreement with unpruned").endswith("%")
    assert metric(at, "KL from unpruned").endswith("nats")
    texts = [t.value for t in at.text]
    assert len(texts) == 2 and all(t.startswith("The movie was") for t in texts)
    assert float(metric(at, "Tokens per second (unpruned)").replace(",", "")) > 0
    assert float(metric(at, "Tokens per second (pruned)").replace(",", "")) > 0
    store = resources.store("results")
    keys = [k for k in store.keys() if k[0] == "generate"]
    assert keys and all(k[-2] == "The movie was" for k in keys)
    at.slider(key=state.W_BUDGET).set_value(0.7).run()
    assert not at.exception, [e.value for e in at.exception]
    assert float(metric(at, "Perplexity").replace(",", "")) != ppl
    new = [k for k in store.keys() if k[0] == "generate" and k not in keys]
    assert new, "the pruned continuation was not recomputed for the new budget"
    texts_after = [t.value for t in at.text]
    assert len(texts_after) == 2 and texts_after[0] == texts[0]           # the unpruned one is the same
    at.text_input(key="gen_prompt").set_value("the film").run()
    assert [t.value for t in at.text][0].startswith("the film")
    # past the model's 64 positions: the last prompt tokens that fit, said on the page (issue 23, 5)
    at.text_input(key="gen_prompt").set_value(" ".join(WORDS * 3)).run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("exceed this model's 64 positions: both models read only its last 34 tokens" in i.value
               for i in at.info), [i.value for i in at.info]
    assert same_state(ws.model, snapshot)                                   # the shared model is untouched


def test_a_budget_moved_back_to_is_drawn_at_once_and_the_superseded_generation_stops(app, monkeypatch):
    """Issue 22 (6): the generation panel ran inside the page's run (about 50 s of timing and text on the
    LM demo), so a slider move waited for it. Now it runs in the session's job after the timing; a
    stored budget moved back to is drawn while that job is inside a long step, and the job stops at its
    next token without storing a half pair of continuations."""
    import threading
    import time

    from kcm_app import engine, live
    from kcm_app.engine import evaluations
    from kcm_core.pipeline import PruneConfig
    from kcm_core.repair import RepairConfig
    at = app("pages/5_prune.py", budget="0.9", method="kcm")
    finish_background()
    at.run()
    texts = [t.value for t in at.text]
    assert len(texts) == 2
    entered, release, tokens = threading.Event(), threading.Event(), []

    def slow_generate(model, tokenizer, prompt, new_tokens, progress=None):
        entered.set()
        release.wait(60)               # a long step that reports nothing (a big model's prompt pass)
        for i in range(new_tokens * 100):
            progress(f"new token {i}", i / new_tokens)
            tokens.append(i)
            time.sleep(0.01)
        return "never shown"
    monkeypatch.setattr(evaluations, "generate", slow_generate)
    monkeypatch.setattr(live, "FIRST_WAIT_S", 0.0)
    at.slider(key=state.W_BUDGET).set_value(0.8).run()
    job = at.session_state[state.EVALUATOR].current
    deadline = time.time() + 60
    while not entered.is_set() and time.time() < deadline:
        time.sleep(0.02)
    assert entered.is_set(), job.message              # evaluated and timed, now generating in the job
    at.slider(key=state.W_BUDGET).set_value(0.9).run()        # back to the stored budget
    assert not at.exception, [e.value for e in at.exception]
    assert not job.done and job.abandoned                     # drawn without waiting for the job
    assert [t.value for t in at.text] == texts
    assert any(c.value == "Readouts at 0.90 relative FLOPs." for c in at.caption)
    release.set()
    assert job.wait(30) and isinstance(job.error, live.Abandoned) and tokens == []
    ws, store = at.session_state[state.WORKSPACE], resources.store("results")
    left = PruneConfig(method="kcm", budget=0.8, scale_samples=engine.scale_samples(ws), repair=RepairConfig("auto"))
    assert engine.is_evaluated(ws, left, store) and engine.is_timed(ws, left, store)
    assert not engine.is_generated(ws, left, engine.DEFAULT_PROMPT, store)      # no half result stored


def in_page_order(node):
    """``node`` (an ``AppTest`` block or element) and everything under it, depth first: the order they
    are drawn in."""
    yield node
    for child in getattr(node, "children", {}).values():
        yield from in_page_order(child)


def test_the_readouts_come_right_after_the_slider_before_the_chart_and_the_generation(app):
    """Issue 22 (7): the LM readouts sat below the kept-neurons chart and the notes, under the fold of a
    1440 x 1000 window (the real-browser test measures it). Now every readout is drawn right after the
    slider, and the long notes wait in an expander after them."""
    at = app("pages/5_prune.py", budget="0.9")
    order = list(in_page_order(at.main))
    where = {}
    for i, element in enumerate(order):
        name = getattr(element, "label", None) or getattr(element, "value", None)
        if element.type in ("metric", "slider", "expander", "subheader") and isinstance(name, str):
            where.setdefault(name, i)
        elif element.type == "plotly_chart":
            where.setdefault("first chart", i)
    readouts = ["Relative FLOPs", "Parameters", "Neurons pruned", "Estimated speedup", "Measured speedup",
                "Perplexity", "Agreement with unpruned", "KL from unpruned"]
    assert all(label in where for label in readouts), sorted(where)
    assert where["Relative FLOPs to keep"] < min(where[label] for label in readouts)
    last = max(where[label] for label in readouts)
    assert last < where["How these readouts were measured"] < where["first chart"] < where["Generation"]


def test_the_scores_page_sets_kcms_pooled_allocation_beside_the_defaults_standardised_one(app):
    """Issue 22 (7): on a language model the allocation chart opens on the paper's KCM (pooled ranking)
    and the LM default (curve), both keeping the same total at the session's budget."""
    from test_app import points
    at = app("pages/3_scores.py", budget="0.8")
    assert (at.selectbox(key="alloc_method_a").value, at.selectbox(key="alloc_method_b").value) == (
        "kcm", DEFAULT_LM_METHOD)
    chart = next(c for c in at.get("plotly_chart") if "FFN neurons kept per layer at 0.80" in c.proto.spec)
    bars = [t for t in json.loads(chart.proto.spec)["data"] if t["type"] == "bar"]
    assert [t["name"] for t in bars] == ["KCM (R2D2) (pooled)", "Fluctuation + refit, curve allocation (curve)"]
    totals = {int(points(t["y"]).sum()) for t in bars}
    assert len(totals) == 1 and 0 < totals.pop() < 2 * 37


def shown_text(at: AppTest) -> list[str]:
    """Every string a reader of the page may see: values, labels, help texts, chart specs (titles, axes)."""
    texts = []
    for element in in_page_order(at._tree):
        for source in (element, getattr(element, "proto", None)):
            for name in ("value", "label", "help", "body", "spec"):
                value = getattr(source, name, None)
                if isinstance(value, str):
                    texts.append(value)
    return texts


def test_no_page_calls_a_language_models_blocks_sequences_or_examples(app):
    """Issue 22 (7): an LM page names its decoder layers and its token blocks, never the classifier's
    encoder, sequences or examples (the Cost page's axes, the Prune page's paired reference, the Export
    page's report, the sidebar's data help said so)."""
    import re
    wrong = re.compile(r"\b(encoders?|sequences?|examples?)\b", re.IGNORECASE)
    at = app()
    found = {}
    for page in PAGES:
        at.switch_page(page).run()
        if page == "pages/5_prune.py":
            at.multiselect(key="compare_methods").set_value(["kcm", "wanda-sp"])
            at.multiselect(key="compare_budgets").set_value([0.9])
            at.button(key="compare_run").click().run()
        assert not at.exception, (page, [e.value for e in at.exception])
        for text in shown_text(at):
            for match in wrong.finditer(text):
                found.setdefault(page, []).append(text[max(0, match.start() - 60):match.end() + 30])
    assert found == {}
    assert at.switch_page("pages/5_prune.py").run().main.caption[0].value.startswith(
        "Choose how much of the FLOPs to keep and see the pruned model's size, speed and perplexity")


def test_lm_comparison_plots_perplexity_on_a_log_axis(app):
    at = app("pages/5_prune.py", budget="0.9")
    at.multiselect(key="compare_methods").set_value(["kcm", "wanda-sp"])
    at.multiselect(key="compare_budgets").set_value([0.8, 0.9])
    at.button(key="compare_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    charts = [c for c in at.get("plotly_chart") if "Perplexity vs relative FLOPs" in c.proto.spec]
    assert charts
    # beside it: Wanda-sp's perplexity over KCM's on the same blocks, with the paired interval
    paired = [c.proto.spec for c in at.get("plotly_chart") if "Difference from" in c.proto.spec]
    assert paired and "Difference from KCM (R2D2)" in paired[0] and "Wanda-sp" in paired[0]
    assert any("on the same held-out blocks" in c.value for c in at.caption)
    spec = json.loads(charts[0].proto.spec)
    assert spec["layout"]["yaxis"]["type"] == "log"


def test_export_writes_a_causal_lm_with_perplexity_before_and_after(export_reload, app, tmp_path):
    at = app("pages/6_export.py", budget="0.9", method="kcm")
    out = tmp_path / "export"
    at.text_input(key="export_dir").set_value(str(out))
    at.button(key="export_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    report = json.loads((out / "report.json").read_text())
    ev = report["evaluation"]
    assert ev["before"]["perplexity"]["value"] > 1 and ev["after"]["perplexity"]["value"] > 1
    assert set(ev["after"]) == {"perplexity", "agreement", "kl"} and "perplexity_ratio" in ev["paired"]
    assert report["data"]["unit"] == "blocks"
    from kcm_core.export import load_pruned
    assert type(load_pruned(out)).__name__ == "LlamaForCausalLM"          # the LM head is kept


def test_a_language_model_opens_at_its_own_default_budget_unless_a_link_chose_one(app):
    at = app("pages/5_prune.py")
    assert at.session_state[state.BUDGET] == state.LM_DEFAULT_BUDGET == 0.9
    assert at.slider(key=state.W_BUDGET).value == 0.9
    at = app("pages/5_prune.py", budget="0.8")
    assert at.slider(key=state.W_BUDGET).value == 0.8


def test_the_repair_is_a_control_of_its_own_and_reaches_the_readouts(app):
    at = app("pages/5_prune.py", budget="0.9", method="d2")
    assert at.selectbox(key=state.W_REPAIR).value == "auto"
    assert any("one scale per kept neuron" in c.value for c in at.caption)       # D2's own: the paper's scaling
    at.selectbox(key=state.W_REPAIR).set_value("refit").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("every kept down-projection row refitted" in c.value for c in at.caption)
    keys = [k for k in resources.store("results").keys() if k[0] == "budget"]
    assert {k[-1] for k in keys} >= {"pooled"} and any("refit" in repr(k) for k in keys)


def test_a_restarted_server_reads_a_language_models_budget_from_disk(app, monkeypatch):
    import streamlit as st
    from kcm_app.engine import evaluations
    at = app("pages/5_prune.py", budget="0.9", method="flap")
    ppl = metric(at, "Perplexity")
    finish_background()
    st.cache_resource.clear()                     # memory is empty, the disk is not

    def refuse(*args, **kwargs):
        raise AssertionError("the pruned model was evaluated again")
    monkeypatch.setattr(evaluations, "paired_perplexity", refuse)
    at = app("pages/5_prune.py", budget="0.9", method="flap")
    assert not at.exception, [e.value for e in at.exception]
    assert metric(at, "Perplexity") == ppl


def test_the_default_lm_export_with_uniform_widths_loads_with_stock_transformers(export_reload, app, tmp_path):
    import transformers as T
    at = app("pages/6_export.py", budget="0.9")
    assert at.session_state[state.METHOD] == DEFAULT_LM_METHOD        # the language-model default
    out = tmp_path / "uniform"
    at.text_input(key="export_dir").set_value(str(out))
    at.checkbox(key="export_uniform").check().run()
    at.button(key="export_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    report = json.loads((out / "report.json").read_text())
    assert report["method"]["name"] == DEFAULT_LM_METHOD and report["repair"]["kind"] == "refit"
    widths = report["neurons"]["kept_per_layer"]
    assert len(set(widths)) == 1
    model = T.AutoModelForCausalLM.from_pretrained(out)                  # no project code
    assert model.config.intermediate_size == widths[0]


def test_the_landing_page_says_what_the_language_model_default_adds_with_its_measurement(app):
    from kcm_app import charts
    at = app()
    assert any("not the paper's KCM" in i.value for i in at.info)
    frame, dense = charts.lm_default_frame()                     # the committed results file
    assert {DEFAULT_LM_METHOD, "flap"} <= set(frame["method"]) and dense > 1
    assert any("Perplexity vs relative FLOPs" in c.proto.spec for c in at.get("plotly_chart"))

"""Every page through the entry point (``AppTest.from_file("app.py")``) on a tiny model and CSV.

``KCM_APP_MODEL`` / ``KCM_APP_DATA`` point the app at a tiny BERT written into a temporary folder;
the real demo and the network are never touched. Widgets are found by key. Every run goes through
the entry point, so the sidebar is drawn on each rerun: a page that ``AppTest`` runs on its own runs
app.py in its place, in the same run (``kcm_app.ui.entry_guard``).
"""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from app_tiny import write_tiny
from kcm_app import live, resources, state
from kcm_app.testing import finish_background
from kcm_core import scores as S
from kcm_core.report import SCHEMA
from conftest import app_runner, same_state, state_snapshot

APP = str(Path(__file__).resolve().parents[1] / "app.py")
PAGES = ["pages/1_model.py", "pages/2_cost.py", "pages/3_scores.py", "pages/4_hull.py",
         "pages/5_prune.py", "pages/6_export.py"]
TIMEOUT = 120


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny-app"))


@pytest.fixture
def app(tiny_files, monkeypatch, tmp_path):
    model_dir, csv = tiny_files
    monkeypatch.setenv("KCM_APP_MODEL", str(model_dir))
    monkeypatch.setenv("KCM_APP_DATA", str(csv))
    # AppTest fires no timers (the pending view polls with one): a run waits for its evaluation
    monkeypatch.setattr(live, "FIRST_WAIT_S", TIMEOUT)
    monkeypatch.setenv("KCM_CACHE_DIR", str(tmp_path / "cache"))      # the disk cache, never the user's

    yield app_runner(TIMEOUT)
    finish_background(stop=True)          # no background thread outlives the test's cache folder


def metric(at: AppTest, label: str) -> str:
    found = [m.value for m in at.metric if m.label == label]
    assert found, f"no metric {label!r}; have {[m.label for m in at.metric]}"
    return found[0]


def test_every_page_runs_without_exception(app):
    at = app()
    assert at.title[0].value == "Model and data"
    assert metric(at, "Accuracy (unpruned)").endswith("%")
    for page in PAGES[1:]:
        at.switch_page(page).run()
        assert not at.exception, (page, [e.value for e in at.exception])
        assert not at.error, (page, [e.value for e in at.error])
        assert at.radio(key="data_kind").value == "file", page          # the shared sidebar is drawn


def test_sidebar_values_survive_reruns_and_page_switches(app):
    # From its second run on, AppTest runs the current page script on its own (the pages/ folder's
    # old mode); the page's guard runs app.py in its place within the same run, so the sidebar is
    # drawn every time and its widgets keep their values (button clicks too: the tests below).
    at = app()
    at.number_input(key="seed").set_value(3).run()
    at.select_slider(key="max_len").set_value(64).run()
    for page, title in (("pages/5_prune.py", "Prune"), ("pages/2_cost.py", "Cost")):
        at.switch_page(page).run()
        assert not at.exception, [e.value for e in at.exception]
        assert [t.value for t in at.title] == [title]
        assert at.number_input(key="seed").value == 3 and at.select_slider(key="max_len").value == 64
    assert at.session_state["seed"] == 3
    assert state.ENTRY not in at.session_state          # the entry mark lives for one run only


def test_sidebar_shows_the_tiny_model_and_data(app, tiny_files):
    at = app()
    assert at.session_state["model_kind"] == "folder"
    assert at.session_state["model_ref"] == str(tiny_files[0])
    tables = " ".join(str(t.value.to_dict()) for t in at.table)
    assert "BertForSequenceClassification" in tables and "37" in tables and "data.csv" in tables


def test_budget_slider_updates_the_readouts_and_the_url(app):
    at = app("pages/5_prune.py")
    before = metric(at, "Relative FLOPs")
    params_before = metric(at, "Parameters")
    at.slider(key="w_budget").set_value(0.9).run()
    assert not at.exception
    assert metric(at, "Relative FLOPs") != before
    assert metric(at, "Parameters") != params_before
    assert at.session_state["budget"] == 0.9
    assert at.query_params["budget"] == "0.90"
    assert metric(at, "Accuracy").endswith("%")


def test_method_selector_changes_method_and_url(app):
    at = app("pages/5_prune.py", budget="0.8")
    kept_kcm = at.session_state["budget"], metric(at, "Relative FLOPs")
    at.selectbox(key="w_method").set_value("random").run()
    assert not at.exception
    assert at.session_state["method"] == "random"
    assert at.query_params["method"] == "random"
    assert kept_kcm[0] == 0.8


def test_a_link_restores_budget_and_method(app):
    at = app("pages/5_prune.py", budget="0.85", method="weight-magnitude")
    assert at.slider(key="w_budget").value == 0.85
    assert at.selectbox(key="w_method").value == "weight-magnitude"
    # the view survives a page switch and comes back
    at.switch_page("pages/2_cost.py").run()
    assert at.query_params["budget"] == "0.85"
    at.switch_page("pages/5_prune.py").run()
    assert at.slider(key="w_budget").value == 0.85


def test_two_sessions_keep_their_own_numbers(app):
    a = app("pages/5_prune.py", budget="0.8")
    b = app("pages/5_prune.py", budget="0.95")
    a_flops, b_flops = metric(a, "Relative FLOPs"), metric(b, "Relative FLOPs")
    assert a_flops != b_flops
    b.slider(key="w_budget").set_value(0.7).run()
    a.run()
    assert metric(a, "Relative FLOPs") == a_flops
    assert a.session_state["budget"] == 0.8


def test_the_cached_model_is_never_changed(app):
    at = app()
    ws = at.session_state["workspace"]
    snapshot = state_snapshot(ws.model)
    for page in PAGES[1:5]:
        at.switch_page(page).run()
    at.slider(key="w_budget").set_value(0.75).run()
    at.selectbox(key="w_method").set_value("d2").run()
    assert same_state(ws.model, snapshot)
    assert not ws.model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in ws.model.modules())


def test_compare_button_draws_the_comparison(app):
    at = app("pages/5_prune.py")
    at.multiselect(key="compare_methods").set_value(["kcm", "random"])
    at.multiselect(key="compare_budgets").set_value([0.8, 0.95])
    at.button(key="compare_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    charts = [c for c in at.get("plotly_chart")]
    spec = next(c.proto.spec for c in charts if "Accuracy vs relative FLOPs" in c.proto.spec)
    assert "Random (mean of 3 seeds)" in spec and "KCM" in spec
    assert "current budget" in spec


def test_comparison_shows_paired_differences_from_the_reference_method(app):
    at = app("pages/5_prune.py", budget="0.8")
    at.multiselect(key="compare_methods").set_value(["kcm", "weight-magnitude", "random"])
    at.multiselect(key="compare_budgets").set_value([0.85, 0.95])
    at.button(key="compare_run").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.selectbox(key="compare_reference").value == "kcm"
    spec = next(c.proto.spec for c in at.get("plotly_chart") if "Difference from" in c.proto.spec)
    assert "paired 95% intervals" in spec and "Weight magnitude" in spec
    table = at.dataframe[-1].value
    # weight magnitude and random at 0.80 (the slider's budget is always compared), 0.85 and 0.95
    assert sorted(table["budget"].round(2)) == [0.8, 0.8, 0.85, 0.85, 0.95, 0.95]
    assert ((table["low"] <= table["difference"]) & (table["difference"] <= table["high"])).all()
    assert table["p_value"].between(0, 1).all()
    captions = " ".join(c.value for c in at.caption)
    assert "paired bootstrap" in captions and "McNemar" in captions and "overlap" not in captions
    at.selectbox(key="compare_reference").set_value("weight-magnitude").run()
    spec = next(c.proto.spec for c in at.get("plotly_chart") if "Difference from" in c.proto.spec)
    assert "Difference from Weight magnitude" in spec


def test_cost_page_measures_latency(app):
    at = app("pages/2_cost.py")
    share = metric(at, "FFN share of the counted MACs")
    at.select_slider(key="cost_seq_len").set_value(1024).run()
    assert metric(at, "FFN share of the counted MACs") != share
    at.button(key="cost_measure").click().run()
    assert not at.exception
    assert any("Measured time per block" in c.proto.spec for c in at.get("plotly_chart"))


def test_hull_page_sigma_controls(app):
    at = app("pages/4_hull.py")
    at.select_slider(key="hull_sigma").set_value(2.0).run()
    at.select_slider(key="toy_sigma").set_value(1.6).run()
    assert not at.exception
    assert any("100% of the hull" in c.value for c in at.caption)


def test_hull_page_opens_on_the_background_umap_and_switches_to_pca(app):
    app()                                   # the first session starts the background work
    finish_background()
    at = app("pages/4_hull.py")             # UMAP of layer 0 is stored: the page opens on it
    titles = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("down-projection rows, UMAP" in t for t in titles)
    at.radio(key="hull_projection").set_value("PCA").run()
    assert not at.exception, [e.value for e in at.exception]
    titles = [c.proto.spec for c in at.get("plotly_chart")]
    assert any("down-projection rows, PCA" in t for t in titles)
    assert any("full 32-dimensional weight space" in c.value for c in at.caption)
    ws = at.session_state["workspace"]
    coords = resources.store("results").get(("umap", ws.model_key, 0, 0))
    assert coords.shape == (ws.shape.ffn_width[0], 2)


def test_upload_field_loads_the_file_and_reports_bad_ones(app, tiny_files):
    at = app()
    at.radio(key="data_kind").set_value("upload").run()
    assert not at.exception
    assert any("no file uploaded yet" in e.value for e in at.error)
    at.file_uploader(key="data_upload").upload("reviews.csv", tiny_files[1].read_bytes(), "text/csv").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    ws = at.session_state["workspace"]
    assert ws.info.data_source.endswith("reviews.csv") and ws.info.eval_examples == 96
    assert metric(at, "Accuracy (unpruned)").endswith("%")
    # a named text column the file lacks: the message names it and lists what is there
    at.text_input(key="text_column").set_value("review")
    at.file_uploader(key="data_upload").upload("stars.csv", b"comment,stars\nnice,1\nbad,0\n", "text/csv").run()
    assert not at.exception
    assert any("no text column 'review'" in e.value and "comment, stars" in e.value for e in at.error)
    assert any(e.value.startswith("The model and data did not load") for e in at.main.error)
    at.file_uploader(key="data_upload").upload("empty.csv", b"", "text/csv").run()
    assert any("empty.csv is empty" in e.value for e in at.error)


def test_scores_page_lists_top_and_bottom(app):
    at = app("pages/3_scores.py")
    at.selectbox(key="scores_column").set_value("d2").run()
    at.number_input(key="scores_layer").set_value(1).run()
    assert not at.exception
    assert any("Top 10 of layer 1" in m.value for m in at.markdown)
    # labels, not internal names, in the tables and chart titles
    assert list(at.dataframe[-1].value.columns) == ["Neuron", "D2 (activations)", "R2 (kernel hull, weights)"]
    assert any("D2 (activations) per layer" in c.proto.spec for c in at.get("plotly_chart"))
    # the scatter shows the chosen layer's neurons, coloured by the chosen score; All layers shows every one
    scatter = scatter_trace(at)
    assert scatter["type"] == "scatter" and set(points(scatter["customdata"])[:, 0]) == {1}
    assert len(points(scatter["x"])) == 37 and scatter["marker"]["colorbar"]["title"]["text"] == "D2 (activations)"
    at.checkbox(key="scores_all_layers").check().run()
    scatter = scatter_trace(at)
    assert set(points(scatter["customdata"])[:, 0]) == {0, 1} and len(points(scatter["x"])) == 2 * 37


def allocation_traces(at) -> dict[str, dict]:
    """The Scores page's allocation chart: its bar traces by name, as the browser receives them."""
    chart = next(c for c in at.get("plotly_chart") if "FFN neurons kept per layer at" in c.proto.spec)
    return {t["name"]: t for t in json.loads(chart.proto.spec)["data"] if t["type"] == "bar"}


def test_scores_page_shows_two_methods_allocations_from_the_stored_scores(app, monkeypatch):
    """Issue 22 (7): two methods' kept neurons per layer side by side at the session's budget, KCM and
    (a classifier's default being KCM) weight magnitude first; the scores come from the shared store,
    so another method built from the same components computes none of them again."""
    from kcm_app.engine import scoring
    at = app("pages/3_scores.py", budget="0.7")
    assert at.selectbox(key="alloc_method_a").value == "kcm"
    assert at.selectbox(key="alloc_method_b").value == "weight-magnitude"
    bars = allocation_traces(at)
    assert list(bars) == ["KCM (R2D2) (pooled)", "Weight magnitude (pooled)"]
    ws = at.session_state[state.WORKSPACE]
    kept = {name: points(t["y"]) for name, t in bars.items()}
    assert all(len(k) == ws.shape.layers and (k <= 37).all() for k in kept.values())
    assert len({int(k.sum()) for k in kept.values()}) == 1          # the same budget: the same total kept
    assert any("Allocation is how a budget's kept neurons are spread over the layers: at 0.70" in c.value
               for c in at.caption)
    computed: list[str] = []
    monkeypatch.setattr(S, "r2", lambda *args, **kwargs: computed.append("r2"))
    monkeypatch.setattr(scoring, "collect_stats", lambda *args, **kwargs: computed.append("stats"))
    at.selectbox(key="alloc_method_b").set_value("d2").run()
    assert not at.exception, [e.value for e in at.exception]
    assert list(allocation_traces(at)) == ["KCM (R2D2) (pooled)", "D2 only (pooled)"] and computed == []


def scatter_trace(at) -> dict:
    """The R2 vs D2 scatter's one trace, as the browser receives it."""
    chart = next(c for c in at.get("plotly_chart") if "R2 (weights) vs D2" in c.proto.spec)
    return json.loads(chart.proto.spec)["data"][0]


def points(array) -> np.ndarray:
    """A Plotly array from its JSON: a list, or NumPy's typed-array form {dtype, bdata, shape}."""
    if isinstance(array, dict):
        values = np.frombuffer(base64.b64decode(array["bdata"]), dtype=np.dtype(array["dtype"]))
        return values.reshape([int(n) for n in str(array.get("shape", len(values))).split(",")])
    return np.asarray(array)


def test_missing_model_explains_what_to_do(app, monkeypatch, tmp_path):
    monkeypatch.setenv("KCM_APP_MODEL", str(tmp_path / "nothing-here"))
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception
    # in the main area, with what to do; the sidebar's status box says that loading failed
    assert any("did not load" in e.value and "nothing-here" in e.value for e in at.main.error)
    assert any(i.value.startswith("What to do") for i in at.main.info)
    assert [x.proto.label for x in at.sidebar.get("status")] == ["Failed to load the model and data (see the page)"]
    assert not any("No model is loaded yet" in i.value for i in at.info)


def test_export_saves_a_loadable_model_and_offers_downloads(export_reload, app, tmp_path):
    at = app("pages/6_export.py", budget="0.8")
    out = tmp_path / "pruned"
    at.text_input(key="export_dir").set_value(str(out))
    at.button(key="export_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    from kcm_core.export import load_pruned
    model = load_pruned(out)
    ws = at.session_state["workspace"]
    kept = [b.up.weight.shape[0] for b in __import__("kcm_core").ffn_blocks(model)]
    assert sum(kept) < sum(ws.shape.ffn_width)
    labels = {b.proto.label for b in at.get("download_button")}
    assert {"Report (JSON)", "Report (Markdown)", "Figures (HTML)",
            "Download the pruned model (zip)"} <= labels
    # The saved report is the one the CLI writes: method by its label, accuracy before and after.
    report = json.loads((out / "report.json").read_text())
    assert report["schema"] == SCHEMA and report["method"]["label"] == "KCM (R2D2)"
    assert set(report["evaluation"]["before"]) == {"accuracy"}
    assert set(report["evaluation"]["after"]) == {"accuracy", "agreement"}
    markdown = (out / "report.md").read_text()
    assert "with KCM (R2D2)" in markdown and "{'" not in markdown
    assert "- Accuracy before: " in markdown and "- Accuracy after: " in markdown
    # A rerun that is not the button's (the background work finishing, another widget) keeps the
    # outcome and the download on the page, and says the folder now exists.
    at.run()
    assert any(m.value.startswith(f"Saved to {out}") for m in at.success)
    assert "Download the pruned model (zip)" in {b.proto.label for b in at.get("download_button")}
    assert any("It exists" in c.value for c in at.caption)


def test_an_exported_per_layer_model_opens_and_prunes_again(export_reload, app, tmp_path, monkeypatch):
    """One loader: the app's local folder takes an export with per-layer widths."""
    at = app("pages/6_export.py", budget="0.8")
    out = tmp_path / "pruned"
    at.text_input(key="export_dir").set_value(str(out))
    at.button(key="export_go").click().run()
    widths = json.loads((out / "config.json").read_text())["kcm_ffn_widths"]
    monkeypatch.setenv("KCM_APP_MODEL", str(out))
    again = app("pages/5_prune.py", budget="0.9")
    ws = again.session_state["workspace"]
    assert list(ws.shape.ffn_width) == widths and type(ws.model).__name__ == "BertForSequenceClassification"
    assert not again.error, [e.value for e in again.error]

"""The app's pure parts, without Streamlit: URL state, the shared store, chart data, the engine's
isolation (the shared model is never changed) and its equivalence with ``kcm_core.pipeline``."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import same_state, state_snapshot
from kcm_app import charts, engine, report, state, toy
from kcm_app.projection import layer_points, pca_2d, umap_2d
from kcm_app.sources import DataChoice, ModelChoice, SampleChoice, batches_fingerprint, env_defaults, upload_path
from kcm_app.store import SharedStore
from kcm_app.theme import METHOD_COLORS
from kcm_core.arch import ffn_blocks, model_shape
from kcm_core.flops import cost_report, count_params, relative_flops
from kcm_core.methods import DEFAULT_METHOD, METHODS
from kcm_core.pipeline import PruneConfig, compute_scores, prune, resolve_seq_len
from kcm_core.realise import slice_model
from kcm_core.repair import RepairConfig
from kcm_core.report import SCHEMA


ROOT = Path(__file__).resolve().parents[1]


def make_ws(model, batches) -> engine.Workspace:
    unlabeled = tuple({k: v for k, v in b.items() if k != "labels"} for b in batches)
    shape = model_shape(model.config)
    return engine.Workspace(
        model_key="tiny", model=model, tokenizer=None, shape=shape,
        data_key=batches_fingerprint(unlabeled, batches, batches), unlabeled=unlabeled,
        labeled=tuple(batches), eval_batches=tuple(batches),
        seq_len=resolve_seq_len(shape, unlabeled, None),
        info=engine.WorkspaceInfo(model_name="tiny", data="tiny", data_source="memory", sample=12,
                                  eval_examples=8, eval_source="same", max_len=9))


@pytest.fixture
def ws(tiny_model, tiny_batches):
    model = tiny_model("bert")
    return make_ws(model, tiny_batches(model, n_batches=3, batch_size=4))


# --------------------------------------------------------------------------- state and sources

def test_every_method_has_one_colour():
    assert set(METHODS) <= set(METHOD_COLORS)
    assert len({METHOD_COLORS[m] for m in METHODS}) == len(METHODS)


def test_query_parsing_keeps_valid_values_only():
    assert state.parse_query({"budget": "0.45", "method": "random", "multiple": "8", "repair": "refit"}) == {
        "budget": 0.45, "method": "random", "multiple": 8, "repair": "refit"}
    assert state.parse_query({"budget": ["0.3", "0.7"]}) == {"budget": 0.7}
    assert state.parse_query({"budget": "1.7", "method": "nope", "multiple": "3", "repair": "glue"}) == {}
    assert state.parse_query({"budget": "nan"}) == {}
    assert state.query_for({"budget": 0.6, "method": "kcm"}) == {"budget": "0.60", "method": "kcm",
                                                                 "multiple": "1", "repair": "auto"}
    assert state.parse_query(state.query_for({"budget": 0.55, "method": "d2", "multiple": 16,
                                              "repair": "bias"})) == {
        "budget": 0.55, "method": "d2", "multiple": 16, "repair": "bias"}


def test_a_new_session_starts_from_the_defaults_and_the_link():
    assert state.initial_values({}) == {"budget": 0.6, "method": DEFAULT_METHOD, "multiple": 1, "repair": "auto"}
    assert state.initial_values({"budget": "0.45", "method": "nope", "multiple": "16"}) == {
        "budget": 0.45, "method": DEFAULT_METHOD, "multiple": 16, "repair": "auto"}


def test_sidebar_defaults_follow_the_start_up_choices():
    values = state.sidebar_defaults(*env_defaults({"KCM_APP_MODEL": "/m", "KCM_APP_DATA": "/d.csv",
                                                   "KCM_APP_LABEL_COLUMN": "y"}))
    assert (values["model_kind"], values["model_ref"], values["data_kind"], values["data_ref"]) == (
        "folder", "/m", "file", "/d.csv")
    assert (values["label_column"], values["text_column"], values[state.SEED]) == ("y", "", 0)
    assert state.sidebar_defaults(*env_defaults({}))["model_kind"] == "demo"


def test_the_state_schema_imports_without_streamlit():
    # the parsing is plain Python; only the accessors need a running app (they import it when called)
    probe = "import sys, kcm_app.state; print(any(m.split('.')[0] == 'streamlit' for m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"


def test_budget_is_clamped_to_the_reachable_range():
    assert state.clamp_budget(0.2, floor=0.3412) == 0.35
    assert state.clamp_budget(0.6, floor=0.3412) == 0.6
    assert state.clamp_budget(1.3, floor=0.3412) == 1.0


def test_env_defaults_choose_demo_or_the_named_files():
    model, data = env_defaults({})
    assert (model.kind, data.kind) == ("demo", "demo")
    model, data = env_defaults({"KCM_APP_MODEL": "/m", "KCM_APP_DATA": "/d.csv"})
    assert model == ModelChoice("folder", "/m")
    assert (data.kind, data.ref, data.label_column) == ("file", "/d.csv", None)


def test_bad_choices_raise_value_errors_with_the_value():
    with pytest.raises(ValueError, match="model source"):
        ModelChoice("ftp", "x")
    with pytest.raises(ValueError, match="folder"):
        ModelChoice("folder", " ")
    with pytest.raises(ValueError, match="sample size"):
        SampleChoice(size=0)
    with pytest.raises(ValueError, match="data source"):
        DataChoice("s3", "x")


def test_fingerprint_follows_the_tokens(tiny_model, tiny_batches):
    model = tiny_model("bert")
    a = tiny_batches(model, seed=0)
    b = tiny_batches(model, seed=1)
    assert batches_fingerprint(a) == batches_fingerprint(tiny_batches(model, seed=0))
    assert batches_fingerprint(a) != batches_fingerprint(b)
    assert batches_fingerprint(a, None) != batches_fingerprint(a, a)


def test_upload_path_is_named_by_content_and_keeps_the_file_name(tmp_path):
    p1 = upload_path("my reviews.CSV", b"text\nhi\n", tmp_path)
    assert p1 == upload_path("my reviews.CSV", b"text\nhi\n", tmp_path)      # same upload, same path
    assert p1.name == "my_reviews.CSV" and p1.read_bytes() == b"text\nhi\n"
    assert upload_path("my reviews.CSV", b"text\nho\n", tmp_path).parent != p1.parent
    escaped = upload_path("../../etc/passwd", b"x", tmp_path)
    assert escaped.parent.parent == tmp_path and escaped.name == "passwd.txt"
    assert not list(tmp_path.rglob("*.part"))


# --------------------------------------------------------------------------- store

def test_store_computes_once_for_concurrent_callers():
    store, calls = SharedStore(), []

    def slow():
        calls.append(1)
        time.sleep(0.2)
        return 42
    out = []
    threads = [threading.Thread(target=lambda: out.append(store.get_or_compute("k", slow))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert out == [42] * 4 and len(calls) == 1


def test_store_evicts_least_recent_and_stores_no_failures():
    store = SharedStore(max_entries=2)
    store.put("a", 1)
    store.put("b", 2)
    assert store.get("a") == 1          # a is now the most recent
    store.put("c", 3)
    assert store.keys() == ["a", "c"]
    with pytest.raises(ValueError):
        store.get_or_compute("bad", lambda: (_ for _ in ()).throw(ValueError("boom")))
    assert "bad" not in store
    with pytest.raises(ValueError, match="max_entries"):
        SharedStore(0)


# --------------------------------------------------------------------------- chart data

def test_cost_frame_adds_up_to_the_report(ws):
    report_ = cost_report(ws.shape, 25.0)
    frame = charts.cost_frame(report_, "MMACs")
    counted = frame[frame["counted"]]["value"].sum()
    assert counted == pytest.approx(report_.encoder_macs / 1e6)
    flops = charts.cost_frame(report_, "MFLOPs")
    assert flops["value"].sum() == pytest.approx(2 * frame["value"].sum())
    assert set(frame["block"]) == {"qkv", "attn_out", "attn_matmul", "ffn_up", "ffn_down", "head"}


def test_param_frame_matches_the_real_count(ws):
    report_ = cost_report(ws.shape, 25.0, params=count_params(ws.model))
    frame = charts.param_frame(report_, ws.shape)
    assert frame["value"].sum() == count_params(ws.model).total


@pytest.mark.parametrize("family, up_per_layer", [("bert", 37 * 32 + 37), ("gpt2", 37 * 32 + 37),
                                                  ("llama", 2 * 37 * 32), ("qwen2", 2 * 37 * 32)])
def test_param_frame_counts_the_ffn_as_the_model_stores_it(tiny_model, family, up_per_layer):
    # Qwen2, like LLaMA, has no bias in its MLP (only on Q, K, V): no per-neuron bias in its up share
    model = tiny_model(family)
    shape = model_shape(model.config)
    frame = charts.param_frame(cost_report(shape, 25.0, params=count_params(model)), shape)
    blocks = ffn_blocks(model)
    up = [sum(p.numel() for m in (b.up, b.gate) if m is not None for p in m.parameters()) for b in blocks]
    assert up == [up_per_layer] * 2
    assert frame.loc[frame["block"] == "ffn_up", "value"].tolist() == up
    assert frame.loc[frame["block"] == "ffn_down", "value"].tolist() == [b.down.weight.numel() for b in blocks]
    assert frame["value"].sum() == count_params(model).total


def test_attention_share_grows_with_length(ws):
    curve = charts.attention_share_curve(ws.shape, [8, 64, 512])
    assert list(curve["attention matrix products"]) == sorted(curve["attention matrix products"])
    assert list(curve["FFN"]) == sorted(curve["FFN"], reverse=True)
    sums = curve[["attention matrix products", "attention projections", "FFN"]].sum(axis=1)
    assert np.allclose(sums, 1.0)


def test_savings_table_is_linear_in_the_ffn_share():
    table = charts.savings_table(0.6, (0.5, 1.0))
    assert list(table["FLOPs saved"]) == [0.3, 0.6]
    assert list(table["relative FLOPs"]) == [0.7, 0.4]


def score_columns():
    return {"r2": [torch.tensor([0.3, 0.1, 0.2]), torch.tensor([0.5, 0.4])],
            "d2": [torch.tensor([1.0, 0.0, 0.5]), torch.tensor([0.0, 1.0])]}


def test_score_frame_heatmap_and_extremes():
    frame = charts.score_frame(score_columns())
    assert list(frame["layer"]) == [0, 0, 0, 1, 1] and list(frame["neuron"]) == [0, 1, 2, 0, 1]
    matrix, centres = charts.rank_heatmap(frame, "r2", bins=2)
    assert matrix.shape == (2, 2) and matrix[0, 0] >= matrix[0, 1]
    assert list(centres) == [0.25, 0.75]
    best, worst = charts.top_bottom(frame, 0, "r2", n=2)
    assert list(best["neuron"]) == [0, 2] and list(worst["neuron"]) == [1, 2]


def test_score_densities_match_the_kernel_density_of_each_layer():
    from scipy.stats import gaussian_kde
    rng = np.random.default_rng(0)
    values = np.r_[rng.normal(0, 1, 1500), rng.normal(6, 0.5, 500)]           # two modes
    frame = pd.DataFrame({"layer": np.r_[np.zeros(2000, int), np.ones(3, int), np.full(4, 2)],
                          "r2": np.r_[values, [5.0, 5.0, 5.0], [1.0, np.nan, 2.0, 3.0]]})
    first, constant, with_nan = charts.score_densities(frame, "r2")
    spread = min(values.std(), np.subtract(*np.percentile(values, [75, 25])) / 1.349)
    exact = gaussian_kde(values, bw_method=1.06 * spread * 2000 ** -0.2 / values.std(ddof=1))(first.grid)
    assert first.density.max() == 1.0 and np.abs(first.density - exact / exact.max()).max() < 0.01
    assert first.grid[0] == values.min() and first.grid[-1] == values.max()
    assert first.quartiles == pytest.approx(tuple(np.percentile(values, [25, 50, 75])))
    assert first.mean == pytest.approx(values.mean())
    assert constant.layer == 1 and np.all(constant.density == 1.0)             # no spread: flat, not NaN
    assert with_nan.quartiles[1] == 2.0 and np.isfinite(with_nan.density).all()   # NaN left out


def test_point_charts_draw_svg_up_to_the_limit_and_webgl_beyond():
    from kcm_app import figures
    rng = np.random.default_rng(0)
    for n, kind in ((figures.SVG_MAX_POINTS, "scatter"), (figures.SVG_MAX_POINTS + 1, "scattergl")):
        coords, r2 = rng.normal(size=(n, 2)), rng.random(n)
        fig = figures.projection(coords, r2, r2 > 0.5, np.argsort(-r2)[:5], "layer 0")
        assert {t.type for t in fig.data} == {kind}
        assert sum(len(t.x) for t in fig.data[:2]) == n                  # pruned + kept: every neuron once
        frame = pd.DataFrame({"layer": np.arange(n) % 3, "neuron": np.arange(n), "r2": r2, "d2": r2, "r2d2": r2})
        assert figures.r2_d2_scatter(frame).data[0].type == kind


def test_selected_neurons_reads_plotly_selections():
    frame = charts.score_frame(score_columns())
    assert charts.selected_neurons(frame, None).empty
    picked = charts.selected_neurons(frame, {"selection": {"point_indices": [4, 0, 99]}})
    assert list(zip(picked["layer"], picked["neuron"])) == [(0, 0), (1, 1)]
    picked = charts.selected_neurons(frame, {"selection": {"points": [{"point_index": 3}]}})
    assert list(picked["layer"]) == [1]


def test_budget_grid_stays_above_the_floor():
    grid = charts.budget_grid(0.34)
    assert grid[0] >= 0.36 and grid[-1] == 0.9 and grid == sorted(set(grid))
    assert all(g in charts.BUDGET_OPTIONS for g in grid)


# --------------------------------------------------------------------------- teaching view, projection

def test_hull_vertices_of_a_square_with_inner_points():
    pts = np.array([[0, 0], [1, 0], [1, 1], [0, 1], [0.5, 0.5], [0.2, 0.7]], dtype=float)
    assert sorted(toy.hull_vertices(pts)) == [0, 1, 2, 3]


def test_r2_picks_the_hull_at_a_wide_sigma_and_not_at_a_tiny_one():
    points = toy.toy_points()
    assert toy.hit_rate(toy.toy_r2(points, sigma=1.0)) == 1.0
    assert toy.hit_rate(toy.toy_r2(points, sigma=0.05)) < 0.5


def test_pca_is_deterministic_and_two_dimensional(ws):
    pts = layer_points(ws.model, 1)
    assert pts.shape == (37, 32)
    a, b = pca_2d(pts), pca_2d(pts.copy())
    assert a.shape == (37, 2) and np.array_equal(a, b)
    with pytest.raises(ValueError, match="layer"):
        layer_points(ws.model, 5)


def test_pca_axes_are_the_leading_singular_vectors():
    # points stretched along two known directions: the projection is the SVD's, up to each axis' sign
    rng = np.random.default_rng(0)
    pts = rng.normal(size=(200, 16)) * np.r_[5.0, 3.0, np.full(14, 0.5)]
    centred = pts - pts.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:2].T
    got = pca_2d(pts)
    assert np.allclose(np.abs(got), np.abs(expected), atol=1e-8)
    assert np.var(got[:, 0]) > np.var(got[:, 1])


def test_umap_keeps_neighbours_together_and_follows_its_seed():
    # two tight, far-apart clusters of 30 points in 12-D: UMAP must keep them apart in 2-D
    rng = np.random.default_rng(0)
    centres = np.zeros((2, 12))
    centres[1, 0] = 50.0
    points = np.concatenate([c + rng.normal(size=(30, 12)) for c in centres]).astype(np.float32)
    a, b, c = umap_2d(points, seed=0), umap_2d(points, seed=0), umap_2d(points, seed=1)
    assert a.shape == (60, 2) and np.isfinite(a).all()
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    within = max(np.linalg.norm(a[:30] - a[:30].mean(0), axis=1).max(),
                 np.linalg.norm(a[30:] - a[30:].mean(0), axis=1).max())
    assert np.linalg.norm(a[:30].mean(0) - a[30:].mean(0)) > 2 * within
    few = points[:10]                                   # too few points for 15 neighbours: PCA
    assert np.array_equal(umap_2d(few), pca_2d(few))


# --------------------------------------------------------------------------- engine

@pytest.mark.parametrize("name", [m for m in METHODS])
def test_method_scores_equal_compute_scores(ws, name):
    config = PruneConfig(method=name, seed=3)
    ours = engine.method_scores(ws, config, SharedStore())
    theirs = compute_scores(ws.model, config, ws.unlabeled, ws.labeled)
    for a, b in zip(ours.scores, theirs.scores):
        torch.testing.assert_close(a, b)
    if theirs.grad_scores is not None:
        for a, b in zip(ours.grad_scores, theirs.grad_scores):
            torch.testing.assert_close(a, b)


def test_readout_counts_match_the_sliced_model(ws):
    store = SharedStore()
    config = PruneConfig(method="kcm", budget=0.85)
    scores = engine.method_scores(ws, config, store)
    fast = engine.readout(ws, scores, config, store)
    sliced = slice_model(ws.model, fast.plan)
    assert fast.params_after == count_params(sliced).total
    assert fast.relative_flops == pytest.approx(relative_flops(ws.shape, ws.seq_len, fast.plan.kept_counts))
    assert fast.relative_flops <= 0.85 + 1e-9
    assert fast.neurons_kept == engine.neurons_for_budget(ws, 0.85)


def test_pruned_fraction_maps_back_to_flops(ws):
    assert engine.budget_for_pruned_fraction(ws, 0.0) == pytest.approx(1.0)
    assert engine.budget_for_pruned_fraction(ws, 1.0) == pytest.approx(ws.floor)
    with pytest.raises(ValueError, match="fraction"):
        engine.budget_for_pruned_fraction(ws, 1.5)


def test_engine_never_changes_the_shared_model(ws):
    snapshot = state_snapshot(ws.model)
    flags = [m.training for m in ws.model.modules()]
    store = SharedStore()
    for name in METHODS:
        engine.evaluate_budget(ws, PruneConfig(method=name, budget=0.8, scale_samples=4), store)
    engine.measure_speed(ws, PruneConfig(method="kcm", budget=0.8, scale_samples=4), store)
    from kcm_app.latency import block_latency
    block_latency(ws.model, engine.timing_batch(ws), repeats=1)
    assert same_state(ws.model, snapshot)
    assert [m.training for m in ws.model.modules()] == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in ws.model.modules())


def test_evaluate_budget_is_stored_and_reused(ws):
    store = SharedStore()
    config = PruneConfig(method="kcm", budget=0.8, scale_samples=4)
    assert not engine.is_evaluated(ws, config, store)
    first = engine.evaluate_budget(ws, config, store)
    assert engine.is_evaluated(ws, config, store)
    assert engine.evaluate_budget(ws, config, store) is first
    dense = engine.reference(ws, store)
    assert first.accuracy.n == first.agreement.n == 12
    # agreement is the share of test examples whose pruned prediction is the unpruned one
    same = (first.predictions == dense.predictions).float().mean().item()
    assert first.agreement.value == pytest.approx(same)
    assert first.plan.info.scaled_layers == 2
    assert first.relative_flops <= 0.8 + 1e-9


@pytest.mark.parametrize("name, repair", [("kcm", "auto"), ("flap", "auto"), ("weight-magnitude", "bias"),
                                          ("fluct-refit", "auto"), ("d2", "scales+bias")])
def test_scaled_plan_is_the_pipelines_plan(ws, name, repair):
    """The app's plan is ``kcm_core.pipeline.prune``'s, its scores, teacher outputs and statistics served
    from the shared store: the same neurons, scales, bias shifts and refitted rows. (The repair sample is
    the whole scoring sample here: FLAP's bias means of a method that collects no statistics are the
    whole sample's in the app, the repair sample's in the CLI.)"""
    config = PruneConfig(method=name, budget=0.8, repair=RepairConfig(repair))
    store = SharedStore()
    ours = engine.scaled_plan(ws, engine.method_scores(ws, config, store), config, store)
    theirs = prune(ws.model, replace(config, seq_len=ws.seq_len), ws.unlabeled, ws.labeled).plan
    assert ours == theirs
    for a, b in zip(ours.layers, theirs.layers):
        assert (a.rows is None) == (b.rows is None) and (a.rows is None or torch.equal(a.rows, b.rows))


@pytest.mark.parametrize("name, repair, computed", [
    ("kcm", "auto", ["collect_stats", "r2", "teacher_targets"]),      # scores from both, scales on the teacher
    ("weight-magnitude", "bias", ["collect_stats"]),                  # FLAP's bias from the stored statistics
])
def test_a_second_budget_computes_no_step_again(ws, monkeypatch, name, repair, computed):
    """``scaled_plan`` gives the pipeline the store's steps under the keys the app has always used: the
    first budget computes each once, another budget of the same method none again."""
    from kcm_app.engine import evaluations, scoring
    from kcm_core import pipeline, scaling, scores as S
    calls: list[str] = []

    def count(module, attribute):
        original = getattr(module, attribute)
        monkeypatch.setattr(module, attribute, lambda *a, **k: calls.append(attribute) or original(*a, **k))
    for module, attribute in ((S, "r2"), (scoring, "collect_stats"), (pipeline, "collect_stats"),
                              (evaluations, "teacher_targets"), (scaling, "teacher_targets")):
        count(module, attribute)
    store = SharedStore()
    config = PruneConfig(method=name, budget=0.8, scale_samples=4, repair=RepairConfig(repair))
    engine.evaluate_budget(ws, config, store)
    assert sorted(calls) == computed
    assert ("stats", ws.model_key, ws.data_key) in store
    assert (("teacher", ws.model_key, ws.data_key, 4) in store) == ("teacher_targets" in computed)
    calls.clear()
    engine.evaluate_budget(ws, replace(config, budget=0.85), store)
    assert calls == []


def test_speed_is_measured_apart_and_stored(ws):
    store = SharedStore()
    config = PruneConfig(method="kcm", budget=0.8, scale_samples=4)
    speed = engine.measure_speed(ws, config, store)         # evaluates the budget first when needed
    assert engine.is_evaluated(ws, config, store)
    assert speed.dense_seconds > 0 and speed.pruned_seconds > 0 and "alternately" in speed.timed_on
    assert engine.measure_speed(ws, config, store) is speed


def test_comparison_reports_every_pair_in_order(ws):
    results = engine.comparison(ws, ["weight-magnitude", "d2"], [0.8, 0.9],
                                PruneConfig(scale_samples=4), SharedStore())
    frame = charts.comparison_frame(results)
    assert list(zip(frame["method"], frame["budget"])) == [
        ("weight-magnitude", 0.8), ("weight-magnitude", 0.9), ("d2", 0.8), ("d2", 0.9)]
    assert (frame["acc_low"] <= frame["accuracy"]).all() and (frame["accuracy"] <= frame["acc_high"]).all()
    assert (frame["seeds"] == 1).all()


def test_comparison_draws_random_with_several_seeds(ws):
    base = PruneConfig(scale_samples=4, seed=5)
    configs = engine.comparison_configs(["random", "kcm"], [0.8, 0.9], base, random_seeds=3)
    assert [(c.method, c.seed, c.budget) for c in configs] == [
        ("random", 5, 0.8), ("random", 5, 0.9), ("random", 6, 0.8), ("random", 6, 0.9),
        ("random", 7, 0.8), ("random", 7, 0.9), ("kcm", 5, 0.8), ("kcm", 5, 0.9)]
    results = engine.comparison(ws, ["random"], [0.8], base, SharedStore(), random_seeds=3)
    assert [r.seed for r in results] == [5, 6, 7]
    assert len({r.plan.layers[0].keep_idx for r in results}) > 1       # three different draws
    frame = charts.comparison_frame(results)
    row = frame.iloc[0]
    accs = [r.accuracy.value for r in results]
    assert len(frame) == 1 and row["seeds"] == 3
    assert row["accuracy"] == pytest.approx(sum(accs) / 3)
    assert row["acc_low"] == min(r.accuracy.low for r in results)
    assert row["acc_high"] == max(r.accuracy.high for r in results)


def test_block_latency_has_every_block(ws):
    from kcm_app.latency import block_latency
    frame = block_latency(ws.model, engine.timing_batch(ws), repeats=2)
    assert set(frame["part"]) == {"layer 0", "layer 1", "embeddings + head"}
    assert (frame["ms"] > 0).all()


def test_report_holds_plan_numbers_and_environment(ws):
    store = SharedStore()
    config = PruneConfig(method="kcm", budget=0.8, scale_samples=4)
    result = engine.evaluate_budget(ws, config, store)
    dense = engine.reference(ws, store).accuracy
    data = report.build_report(ws, config, result, dense, engine.measure_speed(ws, config, store))
    as_json = json.loads(report.report_json(data))
    assert as_json["schema"] == SCHEMA and as_json["method"]["label"] == "KCM (R2D2)"
    assert as_json["neurons"]["kept_per_layer"] == result.plan.kept_counts
    assert as_json["evaluation"]["before"]["accuracy"]["value"] == dense.value
    assert as_json["evaluation"]["after"]["accuracy"] == result.accuracy.to_dict()
    assert as_json["environment"]["torch"] == torch.__version__
    md = report.report_markdown(data)
    assert "with KCM (R2D2)" in md and f"{result.relative_flops:.4f}" in md
    assert f"- Accuracy before: {dense.value:.1%}" in md and "- Accuracy after: " in md
    assert "- Scaling: 2 layers scaled\n" in md
    import plotly.graph_objects as go
    html = report.figures_html({"a": go.Figure(), "b": go.Figure()}, "t")
    assert html.count("<h2") == 2 and html.count("plotly.js v") <= 1
    assert isinstance(charts.kept_frame(result.plan), pd.DataFrame)


def test_the_classifier_reports_paired_difference_is_in_the_apps_export(ws):
    """Issue 23 (13): the app's classifier report lacked the paired after-minus-before difference that the
    CLI's report (and the README) give: ``evaluation.paired.accuracy_difference``."""
    from kcm_core.evaluate import labels_of, paired_difference
    store = SharedStore()
    config = PruneConfig(method="kcm", budget=0.8, scale_samples=4)
    result = engine.evaluate_budget(ws, config, store)
    dense = engine.reference(ws, store)
    data = report.build_report(ws, config, result, dense.accuracy, None, dense_hits=dense.hits)
    after_hits = result.predictions == labels_of(ws.eval_batches)
    expected = paired_difference(after_hits, dense.hits, ws.info.seed).to_dict()
    assert json.loads(report.report_json(data))["evaluation"]["paired"]["accuracy_difference"] == \
        json.loads(json.dumps(expected))
    assert expected["value"] == pytest.approx(result.accuracy.value - dense.accuracy.value)


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_the_model_pages_parameter_bar_adds_up_to_the_model(family):
    from conftest import build_tiny_model
    from kcm_app import figures
    model = build_tiny_model(family)
    shape = model_shape(model.config)
    frame = charts.param_frame(cost_report(shape, 16, params=count_params(model)), shape)
    bars = {bar.name: bar.x[0] for bar in figures.param_summary(frame).data}
    assert sum(bars.values()) == count_params(model).total
    ffn = sum(charts.ffn_up_params(shape, n) + n * shape.hidden for n in shape.ffn_width)
    assert bars[charts.BLOCK_LABELS["ffn_up"]] + bars[charts.BLOCK_LABELS["ffn_down"]] == ffn


def test_stopping_the_background_work_ends_the_running_step_at_its_next_report_and_skips_the_rest():
    from kcm_app.background import Precompute, Step
    reports, first_report = [], threading.Event()

    def long_step(progress):               # a scoring loop: one report per layer
        for layer in range(10_000):
            progress(f"layer {layer}", layer / 10_000)
            reports.append(layer)
            first_report.set()
            threading.Event().wait(0.001)

    ran_later = []
    work = Precompute([Step("scores", long_step), Step("umap", lambda p: ran_later.append(1))])
    thread = threading.Thread(target=work.run)
    thread.start()
    assert first_report.wait(30)
    work.stop()
    assert work.wait_done(30)
    thread.join(30)
    assert work.stopped == ["scores", "umap"] and work.finished == [] and not work.errors
    assert len(reports) < 10_000 and not ran_later
    assert work.has("scores") and work.has("umap")      # pages stop waiting and compute them themselves


def test_background_work_that_is_not_stopped_runs_every_step():
    from kcm_app.background import Precompute, Step
    work = Precompute([Step("a", lambda p: p("half", 0.5)), Step("b", lambda p: None)])
    work.run()
    assert work.finished == ["a", "b"] and work.stopped == [] and work.done


def test_the_lm_comparison_axis_stops_at_collapsed_and_says_so():
    import numpy as np
    import pandas as pd
    from kcm_app import charts, figures
    frame = pd.DataFrame({"method": ["kcm", "kcm", "flap"], "relative_flops": [0.9, 0.6, 0.9],
                          "accuracy": [80.0, 1e60, 77.0], "acc_low": [70.0, 1e59, 70.0],
                          "acc_high": [90.0, 1e61, 85.0], "seeds": [1, 1, 1]})
    fig = figures.comparison_lm(frame, 64.0, 0.9)
    top = np.log10(charts.COLLAPSED_RATIO * 64.0)
    assert fig.layout.yaxis.range[1] == top and fig.layout.yaxis.range[0] < np.log10(64.0)
    assert any("collapsed" in (a.text or "") for a in fig.layout.annotations)
    calm = figures.comparison_lm(frame[frame["accuracy"] < 1e3], 64.0, 0.9)
    assert calm.layout.yaxis.range is None


def test_the_estimated_speedup_of_a_language_model_counts_its_unpruned_head():
    from types import SimpleNamespace
    from conftest import tiny_config
    from kcm_app.engine.readouts import estimated_speedup
    from kcm_core.arch import model_shape
    from kcm_core.flops import cost_report
    config = tiny_config("llama")
    config.architectures = ["LlamaForCausalLM"]         # as a saved causal LM's config says
    shape = model_shape(config)
    lm = SimpleNamespace(is_lm=True, shape=shape, seq_len=16.0)
    report = cost_report(shape, 16.0)
    expected = (report.encoder_macs + report.head_macs) / (0.8 * report.encoder_macs + report.head_macs)
    assert report.head_macs > 0 and estimated_speedup(lm, 0.8) == pytest.approx(expected)
    assert 1 < estimated_speedup(lm, 0.8) < 1 / 0.8
    assert estimated_speedup(SimpleNamespace(is_lm=False, shape=shape, seq_len=16.0), 0.8) == pytest.approx(1.25)


EXITS_WHILE_WORKING = """
import sys, threading, time
sys.path.insert(0, sys.argv[2])
from kcm_app import background

def slow(progress):
    try:
        while True:                      # long work that reports progress, as every step does
            progress("working", 0.5)
            time.sleep(0.01)
    finally:
        open(sys.argv[1], "w").write("stopped")

work = background.Precompute([background.Step("slow", slow)])
threading.Thread(target=work.run, daemon=True, name="kcm-precompute").start()   # as background.start
time.sleep(1)
"""


def test_a_process_exiting_while_the_background_works_stops_it_first(tmp_path):
    """Issue 23 (minor): a process running the app (``AppTest``) that exited while the background work
    ran killed it inside torch's C++ code: "terminate called without an active exception", exit code
    134. At exit the work is now asked to stop and waited for."""
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", EXITS_WHILE_WORKING, str(tmp_path / "ended"), str(root)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "ended").read_text() == "stopped"

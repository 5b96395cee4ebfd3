"""Issue 12: the live demo. The stale-budget rule (a burst of budgets evaluates at most two of them),
the disk cache (a second server start computes none of the slow parts), the background work, the
Cost formula per architecture, and links that ask for what the app cannot show.

App tests run through the entry point on the tiny model (``app_tiny``); the disk cache lives in a
temporary folder (``KCM_CACHE_DIR``), never the user's.
"""
from __future__ import annotations

import threading
import time

import pytest
import streamlit as st
import torch

from app_tiny import sentences, write_tiny
from conftest import app_runner, tiny_config
from kcm_app import disk_cache, engine, live, projection, resources, state
from kcm_app.engine import evaluations, scoring
from kcm_app.testing import finish_background
from kcm_app.views import cost, prune
from kcm_core import pipeline, scores as S
from kcm_core.arch import model_shape
from kcm_core.flops import mac_per_head, mac_per_neuron
from kcm_core.pipeline import PruneConfig

TIMEOUT = 120


# --------------------------------------------------------------------------- the latest-only runner

def slow_job(log: list, steps: int = 50, pause: float = 0.01):
    """A job that reports progress ``steps`` times (where an abandoned job stops) and records its key."""
    def make(key):
        def run(progress):
            for i in range(steps):
                progress(f"step {i}", i / steps)
                time.sleep(pause)
            log.append(key)
            return key
        return run
    return make


def test_a_burst_of_requests_computes_at_most_two_and_ends_on_the_last():
    runner, done = live.LatestOnly(), []
    make = slow_job(done)
    jobs = [runner.submit(budget, make(budget)) for budget in (0.61, 0.62, 0.63, 0.64, 0.65)]
    assert jobs[-1].wait(10)
    assert jobs[-1].outcome() == 0.65
    assert len(runner.finished) <= 2 and runner.finished[-1] == 0.65
    assert done == runner.finished                     # abandoned jobs never reached their end
    assert all(isinstance(j.error, live.Abandoned) for j in jobs[:-1] if j.key not in runner.finished)


def test_the_same_request_twice_is_one_job_and_a_newer_one_abandons_it():
    runner, done = live.LatestOnly(), []
    make = slow_job(done, steps=200)
    first = runner.submit("a", make("a"))
    assert runner.submit("a", make("a")) is first
    second = runner.submit("b", make("b"))
    assert second.wait(10) and first.done
    assert isinstance(first.error, live.Abandoned) and done == ["b"] and runner.finished == ["b"]


def test_a_job_waiting_behind_another_threads_computation_says_so_and_can_be_abandoned(monkeypatch):
    from kcm_app import store as store_module
    monkeypatch.setattr(store_module, "WAIT_POLL_S", 0.02)
    shared, release = store_module.SharedStore(), threading.Event()
    holder = threading.Thread(target=shared.get_or_compute,
                              args=(("dense", "m", "d"), lambda: release.wait(10) and "unpruned"))
    holder.start()                         # e.g. the background work evaluating the unpruned model
    time.sleep(0.1)
    runner = live.LatestOnly()
    first = runner.submit("a", lambda p: shared.get_or_compute(("dense", "m", "d"), lambda: "mine", p))
    deadline = time.time() + 10
    while "waiting for the unpruned model's evaluation" not in first.message and time.time() < deadline:
        time.sleep(0.02)
    assert "waiting for the unpruned model's evaluation" in first.message
    second = runner.submit("b", lambda p: "b done")      # the user moved on: the blocked job stops
    assert second.wait(10) and second.outcome() == "b done"
    assert isinstance(first.error, live.Abandoned)
    release.set()
    holder.join(10)
    assert shared.get(("dense", "m", "d")) == "unpruned"   # the holder's result was stored, once


def test_a_job_with_nothing_before_it_does_not_claim_to_wait():
    runner, started = live.LatestOnly(), threading.Event()
    job = runner.submit("a", lambda p: started.wait(10))
    assert job.message == "starting" or job.done
    started.set()
    assert job.wait(10)


def test_a_failing_job_hands_its_error_to_the_page():
    runner = live.LatestOnly()

    def boom(progress):
        raise ValueError("budget 0.01 is below the floor")
    job = runner.submit("x", boom)
    assert job.wait(5)
    with pytest.raises(ValueError, match="below the floor"):
        job.outcome()


def counted_forward_passes(model) -> list:
    """A list that grows by one at every forward pass of ``model`` (a hook on a model the test owns)."""
    passes: list = []
    model.register_forward_pre_hook(lambda module, args, kwargs: passes.append(1), with_kwargs=True)
    return passes


def wait_until(condition, timeout: float = 30) -> bool:
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_superseded_job_stops_between_timed_passes():
    """Issue 22 (6): the timing was one step without progress, so a newer budget waited for all of its
    passes. Now each pass reports, and an abandoned timing stops at the next one."""
    from conftest import build_tiny_model, make_batches
    dense, pruned = build_tiny_model("bert"), build_tiny_model("bert", seed=1)
    passes = counted_forward_passes(dense)
    counted_forward_passes(pruned)
    batch = {k: v for k, v in make_batches(dense, labels=False)[0].items()}
    repeats = 10_000                           # minutes of passes unless abandoned
    runner = live.LatestOnly()
    timing = runner.submit("0.80", lambda p: engine.paired_seconds(dense, pruned, batch, repeats, progress=p))
    assert wait_until(lambda: len(passes) >= 3 or timing.done)
    assert timing.message.startswith(("warm-up pass", "pass")), timing.message
    newer = runner.submit("0.90", lambda p: "0.90 drawn")
    assert newer.wait(30) and newer.outcome() == "0.90 drawn"
    assert isinstance(timing.error, live.Abandoned)
    assert len(passes) < repeats + 1           # stopped between two passes, far from the end


def test_keep_only_abandons_a_job_for_another_view_and_nothing_else():
    runner, release = live.LatestOnly(), threading.Event()

    def job(progress):
        while not release.wait(0.01):
            progress("waiting", 0.0)
    running = runner.submit("a", job)
    assert runner.keep_only("a") is None and not running.abandoned       # the view it computes: kept
    assert runner.keep_only("b") is running and running.abandoned         # a stored view supersedes it
    assert running.wait(10) and isinstance(running.error, live.Abandoned)
    assert runner.keep_only("b") is None                                  # nothing left to abandon
    release.set()


# --------------------------------------------------------------------------- the disk cache

@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KCM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_disk_cache_round_trip_is_versioned_atomic_and_clearable(cache_dir):
    calls = []

    def compute():
        calls.append(1)
        return torch.arange(5.0)
    encode, decode = (lambda t: {"t": t}), (lambda p: p["t"])
    first = disk_cache.cached("kind", ("w", 1), compute, encode, decode)
    again = disk_cache.cached("kind", ("w", 1), compute, encode, decode)
    other = disk_cache.cached("kind", ("w", 2), compute, encode, decode)
    assert torch.equal(first, again) and torch.equal(first, other) and len(calls) == 2
    path = disk_cache.path_for("kind", ("w", 1))
    assert path.is_file() and f"v{disk_cache.VERSION}" in path.parts and cache_dir in path.parents
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]     # no temporary left
    path.write_bytes(b"not a torch file")                                       # damaged: computed again
    assert torch.equal(disk_cache.cached("kind", ("w", 1), compute, encode, decode), first)
    assert len(calls) == 3
    assert disk_cache.usage()[0] == 2
    assert disk_cache.clear_all() == 2 and disk_cache.usage() == (0, 0)


def test_a_workspace_without_a_weights_hash_never_touches_the_disk(cache_dir):
    # Two models without a hash would share one key: the second would read the first's results.
    calls = []
    for layers in (2, 4):
        value = disk_cache.cached("r2", ("", "hull"), lambda n=layers: calls.append(n) or [n],
                                  lambda v: {"v": v}, lambda p: p["v"])
        assert value == [layers]
    assert calls == [2, 4] and disk_cache.usage() == (0, 0)


def test_weights_hash_follows_the_weights_not_the_object():
    from conftest import build_tiny_model
    a, b = build_tiny_model("bert"), build_tiny_model("bert")
    assert disk_cache.weights_hash(a) == disk_cache.weights_hash(b)
    with torch.no_grad():
        next(b.parameters())[0, 0] += 1
    assert disk_cache.weights_hash(a) != disk_cache.weights_hash(b)


# --------------------------------------------------------------------------- the app

@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    return write_tiny(tmp_path_factory.mktemp("tiny-live"))


@pytest.fixture
def app(tiny_files, monkeypatch, cache_dir):
    model_dir, csv = tiny_files
    monkeypatch.setenv("KCM_APP_MODEL", str(model_dir))
    monkeypatch.setenv("KCM_APP_DATA", str(csv))
    monkeypatch.setattr(live, "FIRST_WAIT_S", TIMEOUT)
    st.cache_resource.clear()               # a fresh server: empty stores, no background work yet

    yield app_runner(TIMEOUT)
    finish_background()


def forbid(monkeypatch, target, name: str, counter: list) -> None:
    def refuse(*args, **kwargs):
        counter.append(name)
        raise AssertionError(f"{name} was computed again")
    monkeypatch.setattr(target, name, refuse)


def test_a_second_server_start_reads_the_slow_parts_from_disk(app, monkeypatch, cache_dir):
    at = app("pages/3_scores.py")
    finish_background()
    at.switch_page("pages/4_hull.py").run()
    assert not at.exception
    at.switch_page("pages/5_prune.py").run()
    accuracy = [(m.value, m.delta) for m in at.metric if m.label.startswith("Accuracy")]
    assert accuracy, [m.label for m in at.metric]
    assert {p.parent.name for p in cache_dir.rglob("*.pt")} == {"r2", "stats", "grads", "umap", "dense", "budget"}
    st.cache_resource.clear()               # the server restarts: memory is empty, the disk is not
    computed: list[str] = []
    forbid(monkeypatch, S, "r2", computed)
    forbid(monkeypatch, scoring, "collect_stats", computed)
    forbid(monkeypatch, S, "mask_gradients", computed)
    forbid(monkeypatch, projection, "umap_2d", computed)
    forbid(monkeypatch, evaluations, "evaluate_classifier", computed)     # unpruned and pruned alike
    forbid(monkeypatch, pipeline, "repair_plan", computed)             # the repair step (scaling, for KCM)
    at = app("pages/5_prune.py")             # the default budget's readouts, read back, the same values
    assert [(m.value, m.delta) for m in at.metric if m.label.startswith("Accuracy")] == accuracy
    at.switch_page("pages/3_scores.py").run()
    assert any("neurons" in str(c.proto.spec) for c in at.get("plotly_chart"))
    at.switch_page("pages/4_hull.py").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("down-projection rows, UMAP" in c.proto.spec for c in at.get("plotly_chart"))
    finish_background()
    registry, _ = resources._precompute_registry()
    assert [w.errors for w in registry.values()] == [{}]
    assert computed == []


def test_the_model_page_introduces_the_app_and_clears_the_disk_cache(app, cache_dir):
    at = app()
    finish_background()
    assert any("Kernelized Convex Masking" in m.value and "Where to start" in m.value for m in at.markdown)
    assert any(m.value.startswith("Loaded: ") and "text classifier" in m.value for m in at.markdown)
    assert list(cache_dir.rglob("*.pt"))
    at.button(key="clear_disk_cache").click().run()
    assert any(s.value.startswith("Removed ") for s in at.success)
    assert not list(cache_dir.rglob("*.pt"))


def test_every_page_opens_with_one_sentence_on_what_it_shows(app):
    at = app()
    for page in ["pages/2_cost.py", "pages/3_scores.py", "pages/4_hull.py", "pages/5_prune.py",
                 "pages/6_export.py"]:
        at.switch_page(page).run()
        assert not at.exception
        assert at.main.caption[0].value.endswith(".") and len(at.main.caption[0].value) < 200


def test_a_burst_of_slider_moves_evaluates_at_most_two_budgets(app, monkeypatch):
    """Five budgets set one after the other while each evaluation takes a while: the page never
    waits for them, says which budget its readouts show, and only the last (plus, at most, the one
    already running) is evaluated."""
    at = app("pages/5_prune.py")
    finish_background()
    at.run()
    start = float(at.slider(key="w_budget").value)             # the default, or this model's floor
    assert any(c.value == f"Readouts at {start:.2f} relative FLOPs." for c in at.caption)
    burst = [round(start + 0.01 * i, 2) for i in range(1, 6)]
    original = engine.evaluate_budget

    def slow(ws, config, store, progress=None):
        for i in range(40):                      # 2 s of reported progress, then the real evaluation
            if progress is not None:
                progress("slow test step", i / 40)
            time.sleep(0.05)
        return original(ws, config, store, progress)
    monkeypatch.setattr(engine, "evaluate_budget", slow)
    monkeypatch.setattr(live, "FIRST_WAIT_S", 0.0)
    for budget in burst:
        at.slider(key="w_budget").set_value(budget).run()
        assert not at.exception, [e.value for e in at.exception]
        assert any(c.value == f"Showing the readouts at {start:.2f} relative FLOPs until {budget:.2f} is "
                   "evaluated." for c in at.caption)
        assert [m.label for m in at.metric if m.label.startswith("Accuracy")] == [f"Accuracy at {start:.2f}"]
    runner = at.session_state[state.EVALUATOR]         # made by the burst's first budget
    assert runner.current.wait(30)
    evaluated = runner.finished
    final = PruneConfig(method="kcm", budget=burst[-1], scale_samples=engine.APP_SCALE_SAMPLES)
    assert len(evaluated) <= 2 and evaluated[-1] == prune.view_key(at.session_state["workspace"], final, "")
    monkeypatch.setattr(live, "FIRST_WAIT_S", TIMEOUT)
    at.run()
    assert any(c.value == f"Readouts at {burst[-1]:.2f} relative FLOPs." for c in at.caption)
    assert [m.label for m in at.metric if m.label.startswith("Accuracy")] == ["Accuracy"]
    assert [m for m in at.metric if m.label == "Accuracy"][0].delta.endswith(" pp")


def test_a_running_evaluation_can_be_stopped_and_is_not_restarted_until_asked(app, monkeypatch):
    at = app("pages/5_prune.py")
    finish_background()
    at.run()
    start = float(at.slider(key="w_budget").value)
    original, steps = engine.evaluate_budget, []

    def slow(ws, config, store, progress=None):
        for i in range(400):                     # 20 s of reported progress unless stopped
            progress("slow test step", i / 400)
            steps.append(i)
            time.sleep(0.05)
        return original(ws, config, store, progress)
    monkeypatch.setattr(engine, "evaluate_budget", slow)
    monkeypatch.setattr(live, "FIRST_WAIT_S", 0.0)
    budget = round(start + 0.02, 2)
    at.slider(key="w_budget").set_value(budget).run()
    job = at.session_state[state.EVALUATOR].current
    at.button(key="stop_eval").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert job.wait(10) and isinstance(job.error, live.Abandoned) and len(steps) < 400
    assert any(f"The evaluation of {budget:.2f} relative FLOPs was stopped" in i.value for i in at.info)
    assert at.session_state[state.EVALUATOR].current is job          # nothing started again by itself
    at.run()
    assert at.session_state[state.EVALUATOR].current is job
    monkeypatch.setattr(engine, "evaluate_budget", original)
    monkeypatch.setattr(live, "FIRST_WAIT_S", TIMEOUT)
    at.button(key="resume_eval").click().run()                        # asked for: evaluated now
    assert any(c.value == f"Readouts at {budget:.2f} relative FLOPs." for c in at.caption)


def test_a_budget_moved_back_to_is_drawn_at_once_and_the_superseded_timing_stops(app, monkeypatch):
    """Issue 22 (6): the timing ran inside the page's run, so a slider move waited for it, and a stored
    budget moved back to never abandoned the job of the budget left. Now the timing runs in the
    session's job, the stored budget is drawn while that job is still inside a long step, and the job
    stops at its next pass without storing a timing."""
    from kcm_app.engine import speed
    at = app("pages/5_prune.py")
    finish_background()
    at.run()
    start = float(at.slider(key="w_budget").value)
    stored_speed = [m.value for m in at.metric if m.label == "Measured speedup"]
    assert stored_speed and stored_speed[0].endswith("x")
    entered, release, passes = threading.Event(), threading.Event(), []

    def slow_timing(dense, pruned, batch, repeats=engine.TIMING_REPEATS, progress=None):
        entered.set()
        release.wait(60)               # one long pass that reports nothing (a big model's forward)
        for i in range(1000):
            progress(f"pass {i}", i / 1000)
            passes.append(i)
            time.sleep(0.01)
        return 1.0, 1.0
    monkeypatch.setattr(speed, "paired_seconds", slow_timing)
    monkeypatch.setattr(live, "FIRST_WAIT_S", 0.0)
    other = round(start + 0.05, 2)
    at.slider(key="w_budget").set_value(other).run()
    job = at.session_state[state.EVALUATOR].current
    assert wait_until(entered.is_set, 60), job.message          # evaluated, now timing in the job
    at.slider(key="w_budget").set_value(start).run()           # back to the stored budget
    assert not at.exception, [e.value for e in at.exception]
    assert not job.done and job.abandoned                      # drawn without waiting for the job
    assert any(c.value == f"Readouts at {start:.2f} relative FLOPs." for c in at.caption)
    assert [m.value for m in at.metric if m.label == "Measured speedup"] == stored_speed
    release.set()
    assert job.wait(30) and isinstance(job.error, live.Abandoned)
    assert passes == []                                         # stopped at its first pass after the long one
    ws, store = at.session_state[state.WORKSPACE], resources.store("results")
    left = PruneConfig(method="kcm", budget=other, scale_samples=engine.APP_SCALE_SAMPLES)
    assert engine.is_evaluated(ws, left, store) and not engine.is_timed(ws, left, store)   # no half timing


def test_an_invalid_link_is_corrected_with_a_visible_notice(app):
    at = app(method="no-such-method", budget="0.01")
    notes = [w.value for w in at.main.warning]
    assert any("method 'no-such-method' is not valid" in n for n in notes), notes
    assert any(n.startswith("A budget of 0.01 relative FLOPs is below") for n in notes), notes
    assert at.query_params["method"] in ("kcm", ["kcm"])
    budget = at.query_params["budget"]
    assert float(budget if isinstance(budget, str) else budget[0]) > 0.01
    at.run()                                    # kept on later reruns (issue 23, 13: they vanished)
    assert [w.value for w in at.main.warning] == notes
    at.button(key="dismiss_notices").click().run()
    left = [w.value for w in at.main.warning]
    assert not any("not valid" in w or "relative FLOPs is below" in w for w in left), left   # until dismissed


# --------------------------------------------------------------------------- the Cost formula

@pytest.mark.parametrize("family, gated, grouped, stack", [
    ("bert", False, False, "encoder"), ("distilbert", False, False, "encoder"),
    ("gpt2", False, False, "decoder"), ("llama", True, True, "decoder"), ("qwen2", True, True, "decoder")])
def test_cost_formula_matches_the_architecture(family, gated, grouped, stack):
    shape = model_shape(tiny_config(family))
    text, note = cost.formula(shape), cost.formula_note(shape, 25, lm=False)
    assert (r"= 3\,s\,d" in text) == gated and (r"= 2\,s\,d" in text) == (not gated)
    assert ("H_{kv}" in text) == grouped and ("key/value heads" in note) == grouped
    assert f"the {stack} layers only" in note and cost.stack_name(shape) == stack
    # the formula is the one kcm_core.flops counts with
    s, d, dh = 25, shape.hidden, shape.head_dim
    head = (2 + 2 * shape.kv_heads / shape.heads) * s * d * dh + 2 * s * s * dh
    assert mac_per_head(shape, s) == pytest.approx(head)
    assert mac_per_neuron(shape, s) == (3 if gated else 2) * s * d


def test_cost_headline_follows_the_unit_toggle(app):
    at = app("pages/2_cost.py")
    macs = [m for m in at.metric if m.label == "Encoder cost per sequence"][0].value
    at.radio(key="cost_unit").set_value("MFLOPs").run()
    flops = [m for m in at.metric if m.label == "Encoder cost per sequence"][0].value
    assert macs.endswith("MMACs") and flops.endswith("MFLOPs")
    assert float(flops.split()[0].replace(",", "")) == pytest.approx(2 * float(macs.split()[0].replace(",", "")),
                                                                     abs=0.11)


def test_without_labels_the_prune_page_shows_agreement_with_the_unpruned_model(app, tmp_path, monkeypatch):
    unlabeled = tmp_path / "unlabeled.csv"          # more rows than the 512 scored, so some are held out
    unlabeled.write_text("\n".join(["text"] + [text for text, _ in sentences(600)]) + "\n")
    monkeypatch.setenv("KCM_APP_DATA", str(unlabeled))
    monkeypatch.setenv("KCM_APP_LABEL_COLUMN", "")
    at = app("pages/5_prune.py", budget="0.8")
    assert [m.label for m in at.metric if m.label.startswith("Agreement")] == ["Agreement with unpruned"]
    assert not [m for m in at.metric if m.label.startswith("Accuracy")]
    assert any("No labels: accuracy unavailable." in i.value for i in at.info)

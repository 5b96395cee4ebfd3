"""Readout speed of the Prune page on the embedded demo, measured the way the page computes it.

After the method's scores are computed once, a slider move runs ``engine.readout`` (select + count:
relative FLOPs and parameters), then ``engine.evaluate_budget`` (select, scale on the app's scaling
sample, slice, evaluate the 800 test sentences: accuracy is on screen after this), then
``engine.measure_speed`` (time the sliced model against the unpruned one); both are stored per budget.
Targets (issue): FLOPs and parameters within 100 ms; accuracy within 1 s for a budget already
evaluated and within 5 s for a new one, on 2 CPU cores. Also times whole-page reruns through
Streamlit's ``AppTest`` (script + charts), which is what a user waits for.

    python benchmarks/bench_app.py [--budgets 0.9 0.8 0.7 0.6 0.5] [--method kcm] [--no-apptest]

Writes benchmarks/results/app.json and app.md. Prepares the demo first if needed (minutes, once).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")    # as app.py sets it, before torch loads
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def engine_run(method: str, budgets: list[float], samples: int) -> dict:
    import torch
    from kcm_app import engine
    from kcm_app.resources import workspace
    from kcm_app.sources import DataChoice, ModelChoice, SampleChoice
    from kcm_app.store import SharedStore
    from kcm_core.pipeline import PruneConfig
    from kcm_core.demos.classifier import prepare_demo

    _, prep = timed(prepare_demo, progress=lambda m, f: log(f"  {m}") if f in (0.0, 1.0) else None)
    ws, load = timed(workspace, ModelChoice(), DataChoice(), SampleChoice(size=samples))
    store = SharedStore()
    base = PruneConfig(method=method, scale_samples=engine.APP_SCALE_SAMPLES)
    dense, dense_s = timed(engine.reference, ws, store)
    scores, score_s = timed(engine.method_scores, ws, base, store)
    engine.teacher(ws, base.scale_samples, store)           # part of the first evaluation, done once
    rows = []
    for budget in budgets:
        config = PruneConfig(method=method, budget=budget, scale_samples=engine.APP_SCALE_SAMPLES)
        fast = [timed(engine.readout, ws, scores, config, store)[1] for _ in range(20)]
        result, new_s = timed(engine.evaluate_budget, ws, config, store)     # accuracy on screen
        speed, speed_s = timed(engine.measure_speed, ws, config, store)      # then the timing
        again = [timed(engine.evaluate_budget, ws, config, store)[1] + timed(
            engine.readout, ws, scores, config, store)[1] + timed(
            engine.measure_speed, ws, config, store)[1] for _ in range(5)]
        rows.append({"budget": budget, "relative_flops": result.relative_flops,
                     "readout_ms_median": statistics.median(fast) * 1e3,
                     "readout_ms_max": max(fast) * 1e3,
                     "new_budget_s": new_s, "new_budget_stages_s": result.seconds,
                     "speed_s": speed_s,
                     "evaluated_budget_ms_max": max(again) * 1e3,
                     "accuracy": result.accuracy.to_dict(), "agreement": result.agreement.to_dict(),
                     "measured_speedup": speed.measured_speedup,
                     "estimated_speedup": 1 / result.relative_flops})
        log(f"  {method} @ {budget}: readout {statistics.median(fast) * 1e3:.1f} ms, accuracy after {new_s:.2f} s "
            f"({result.seconds}), timing +{speed_s:.2f} s, accuracy {result.accuracy.value:.3f}, "
            f"speedup {speed.measured_speedup:.2f}x")
    return {"method": method, "demo_prepare_s": prep, "workspace_s": load,
            "sample_sequences": ws.info.sample, "eval_examples": ws.info.eval_examples,
            "seq_len": ws.seq_len, "scale_samples": engine.APP_SCALE_SAMPLES,
            "dense_accuracy": dense.accuracy.to_dict(), "dense_eval_s": dense_s,
            "scores_s": score_s, "score_details": scores.details.to_dict(), "threads": torch.get_num_threads(),
            "budgets": rows}


def apptest_run(method: str, budgets: list[float]) -> dict:
    """Whole Prune-page reruns through AppTest (the same process-wide caches as the server)."""
    from streamlit.testing.v1 import AppTest
    # every rerun goes through app.py (sidebar too), as on the server: see kcm_app.ui.entry_guard
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=900)
    at.query_params.update({"method": method, "budget": f"{budgets[0]:.2f}"})
    _, first = timed(at.run)
    at.switch_page("pages/5_prune.py")
    _, scored = timed(at.run)
    if at.exception:
        raise RuntimeError([e.value for e in at.exception])
    moves = []
    for budget in budgets[1:] + budgets[:1]:
        slider = at.slider(key="w_budget").set_value(budget)
        _, seconds = timed(slider.run)
        moves.append({"budget": budget, "rerun_s": seconds,
                      "relative_flops": next(m.value for m in at.metric if m.label == "Relative FLOPs")})
    return {"first_run_s": first, "prune_page_first_s": scored, "slider_moves": moves,
            "note": "AppTest reruns the whole script on a widget change; the server reruns only the "
                    "readout fragment, so these are upper bounds for a slider move."}


def markdown(data: dict) -> str:
    e = data["engine"]
    env = data["environment"]
    lines = [f"Demo, {e['eval_examples']} test sentences, {e['sample_sequences']} unlabeled sequences "
             f"(mean {e['seq_len']:g} tokens), scaling on {e['scale_samples']}; {env['threads']} threads, "
             f"torch {env['torch']}, {env['cpu']}.", "",
             f"Scores ({e['method']}) once: {e['scores_s']:.1f} s. Unpruned accuracy "
             f"{e['dense_accuracy']['value']:.3f} (evaluated in {e['dense_eval_s']:.1f} s).", "",
             "| budget | relative FLOPs | FLOPs+params readout (ms, median / max) | new budget: accuracy "
             "(s) | then timing (s) | evaluated budget (ms, max) | accuracy | agreement | "
             "speedup measured / estimated |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in e["budgets"]:
        lines.append(f"| {r['budget']:.2f} | {r['relative_flops']:.3f} | {r['readout_ms_median']:.1f} / "
                     f"{r['readout_ms_max']:.1f} | {r['new_budget_s']:.2f} | {r['speed_s']:.2f} | "
                     f"{r['evaluated_budget_ms_max']:.1f} | "
                     f"{r['accuracy']['value']:.3f} | {r['agreement']['value']:.3f} | "
                     f"{r['measured_speedup']:.2f}x / {r['estimated_speedup']:.2f}x |")
    if data.get("apptest"):
        a = data["apptest"]
        lines += ["", f"AppTest whole-page reruns (upper bound of a slider move): first start "
                      f"{a['first_run_s']:.1f} s, Prune page {a['prune_page_first_s']:.1f} s, moves: " +
                  ", ".join(f"{m['budget']:.2f} -> {m['rerun_s']:.2f} s" for m in a["slider_moves"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8, 0.7, 0.6, 0.5])
    parser.add_argument("--method", default="kcm")
    parser.add_argument("--samples", type=int, default=512, help="unlabeled sequences (sidebar default)")
    parser.add_argument("--no-apptest", action="store_true")
    args = parser.parse_args()
    from dataclasses import asdict

    from kcm_core.report import Environment
    log("engine readouts on the demo")
    data = {"engine": engine_run(args.method, args.budgets, args.samples)}
    if not args.no_apptest:
        log("AppTest reruns")
        data["apptest"] = apptest_run(args.method, args.budgets)
    data["environment"] = {**asdict(Environment.here()),
                           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                           "load_average_at_end": os.getloadavg()}
    data["targets"] = {"readout_ms": 100, "evaluated_budget_s": 1, "new_budget_s": 5}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "app.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (RESULTS / "app.md").write_text(markdown(data))
    print(markdown(data))


if __name__ == "__main__":
    main()

"""The Neuron scores page's allocation chart on the real LM demo: kept neurons per layer of the paper's
KCM (pooled ranking) and of the LM default (fluctuation + refit, standardised), computed the way the
page computes them (``kcm_app.engine.method_scores`` from one shared store, then ``engine.readout``).

    python benchmarks/bench_app_lm_allocation.py [--budgets 0.9 0.8]

The default's scores are timed after KCM's, so its time is what the page pays for the second method
once the activation statistics are stored. The app's disk cache goes to a temporary folder (the
user's is untouched). Writes benchmarks/results/app_lm_allocation.json and .md. Needs the LM demo
(``python -m kcm_core demo prepare lm``).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine_line, run_environment, on_lm_demo, timed, write_results  # noqa: E402

METHODS = ("kcm", "fluct-refit")


def measure(budgets: list[float], cache: Path) -> dict:
    from kcm_app import disk_cache, engine, resources
    disk_cache.root = lambda: cache / "v1"          # this run's own disk cache
    from kcm_app.sources import LM_CALIBRATION_BLOCKS, DataChoice, ModelChoice, SampleChoice
    from kcm_app.store import SharedStore
    from kcm_core.pipeline import PruneConfig

    ws, load_s = timed(lambda: resources.workspace(ModelChoice("demo-lm"), DataChoice("demo-lm"),
                                                   SampleChoice(LM_CALIBRATION_BLOCKS, 256, 0)))
    store = SharedStore(max_entries=64)
    out = {"workspace_s": load_s, "widths": ws.widths, "methods": {}}
    for name in METHODS:
        config = PruneConfig(method=name, scale_samples=engine.scale_samples(ws))
        scores, scores_s = timed(lambda: engine.method_scores(ws, config, store))
        plans = {}
        for budget in budgets:
            at = PruneConfig(method=name, budget=budget, scale_samples=engine.scale_samples(ws))
            readout, readout_s = timed(lambda: engine.readout(ws, scores, at, store))
            plans[f"{budget:.2f}"] = {"kept": readout.plan.kept_counts, "readout_s": readout_s,
                                      "allocation": readout.plan.info.allocation}
        out["methods"][name] = {"scores_s": scores_s, "plans": plans}
    return out


def markdown(data: dict) -> str:
    r, env = data["result"], data["environment"]
    width = max(r["widths"])
    lines = ["# Allocation on the LM demo: KCM (pooled) against the LM default (standardised)", "",
             f"SmolLM2-135M, {len(r['widths'])} layers of {width} MLP neurons, the app's calibration blocks. "
             f"Scores: KCM {r['methods']['kcm']['scores_s']:.1f} s cold, then the default "
             f"{r['methods']['fluct-refit']['scores_s']:.2f} s from the stored statistics.", "",
             "| method | allocation | budget | fewest kept in a layer | layers under 25% kept | kept per layer |",
             "|---|---|---|---|---|---|"]
    for name, m in r["methods"].items():
        for budget, plan in m["plans"].items():
            kept = plan["kept"]
            low = min(range(len(kept)), key=kept.__getitem__)
            under = sum(k < 0.25 * w for k, w in zip(kept, r["widths"]))
            lines.append(f"| {name} | {plan['allocation']} | {budget} | {kept[low]} (layer {low}) | {under} | "
                         f"{', '.join(map(str, kept))} |")
    lines += ["", machine_line(env), f"Command: `{env.get('command')}`.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.9, 0.8])
    args = parser.parse_args()
    measured = on_lm_demo(lambda cache: measure(args.budgets, cache))
    if measured is None:
        return 2
    result, load_before = measured
    data = {"settings": vars(args), "result": result, "environment": run_environment(load_before)}
    print(write_results("app_lm_allocation", data, markdown(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

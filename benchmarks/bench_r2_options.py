"""Which R2 options should be the default? KCM on the demo under each open choice of docs/method.md.

For each (sigma mode, sigma, stop rule): R2 iterations per layer, R2 wall time, and the accuracy and
agreement of KCM (R2 x D2, scaled) on the 800 test sentences at the given budgets. The unlabeled
sample is the demo's train split (2048 sentences), one seed: the options are deterministic.

Each option is compared with the default (the first row) at the same budget paired over the same
test sentences (``kcm_core.evaluate.paired_difference``: interval and McNemar's exact p).

    python benchmarks/bench_r2_options.py [--budgets 0.6 0.7]
    python benchmarks/bench_r2_options.py --render-only      # r2_options.md again from its .json

Writes benchmarks/results/r2_options.json and r2_options.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kcm_core.demos import classifier as demo  # noqa: E402
from kcm_core.data import make_batches  # noqa: E402
from kcm_core.evaluate import evaluate_classifier, paired_difference  # noqa: E402
from kcm_core.hull import HullConfig  # noqa: E402
from kcm_core.models import load_model  # noqa: E402
from kcm_core.pipeline import PruneConfig, compute_scores, prune  # noqa: E402
from common import machine_line, run_environment  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OPTIONS = [
    ("median", 1.0, "absolute"),
    ("median", 0.5, "absolute"),
    ("fixed", 1.0, "absolute"),
    ("median", 1.0, "signed"),
]
DEFAULT = OPTIONS[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.7])
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite r2_options.md from r2_options.json, measuring nothing")
    args = parser.parse_args()
    if args.render_only:
        (RESULTS / "r2_options.md").write_text(markdown(json.loads((RESULTS / "r2_options.json").read_text())))
        return
    if not demo.demo_ready():
        sys.exit("the demo is not prepared: run `python -m kcm_core demo prepare` first")
    load_before = os.getloadavg()
    summary = demo.prepare_demo()
    model, tokenizer = load_model(str(summary["model_dir"]))
    train = demo.load_demo_split("train")
    train = train.subset(list(range(min(args.samples, len(train)))))
    unlabeled = make_batches(train, tokenizer, max_len=64, batch_size=64, with_labels=False)
    test = make_batches(demo.load_demo_split("test"), tokenizer, max_len=64, batch_size=64)
    dense = evaluate_classifier(model, test)
    rows, hits = [], {}
    for mode, sigma, rule in OPTIONS:
        hull = HullConfig(sigma=sigma, sigma_mode=mode, stop_rule=rule)
        config = PruneConfig(method="kcm", hull=hull, budget=args.budgets[0])
        start = time.perf_counter()
        scores = compute_scores(model, config, unlabeled)
        r2_seconds = scores.seconds.get("r2", time.perf_counter() - start)
        for budget in args.budgets:
            result = prune(model, PruneConfig(method="kcm", hull=hull, budget=budget), unlabeled,
                           method_scores=scores)
            ev = evaluate_classifier(result.model, test, reference=dense.predictions)
            hits[mode, sigma, rule, budget] = ev.hits
            rows.append({"sigma_mode": mode, "sigma": sigma, "stop_rule": rule, "budget": budget,
                         "r2_iterations": scores.details.r2_iterations, "r2_seconds": r2_seconds,
                         "accuracy": ev.accuracy.to_dict(), "agreement": ev.agreement.to_dict(),
                         "hits": "".join("1" if h else "0" for h in ev.hits.tolist())})
            print(f"{mode} sigma={sigma} {rule} budget={budget}: acc {ev.accuracy.value:.3f} "
                  f"iters {scores.details.r2_iterations}", file=sys.stderr, flush=True)
    for row in rows:       # each option against the default at the same budget, paired over sentences
        key = (row["sigma_mode"], row["sigma"], row["stop_rule"], row["budget"])
        if key[:3] != DEFAULT:
            row["vs_default"] = paired_difference(hits[key], hits[(*DEFAULT, row["budget"])]).to_dict()
    RESULTS.mkdir(exist_ok=True)
    out = {"dense_accuracy": dense.accuracy.to_dict(), "rows": rows, "environment": run_environment(load_before)}
    (RESULTS / "r2_options.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "r2_options.md").write_text(markdown(out))
    print(markdown(out))


def _vs_default(row: dict) -> str:
    key = (row["sigma_mode"], row["sigma"], row["stop_rule"])
    if key == DEFAULT:
        return "(the default)"
    vs = row.get("vs_default")
    if vs is None:
        return "not compared (this file predates the paired comparison; rerun the benchmark)"
    lo, hi = vs["ci95"]
    return f"{100 * vs['value']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}], McNemar p {vs['mcnemar_p']:.3f}"


def markdown(data: dict) -> str:
    dense = data["dense_accuracy"]
    env = data.get("environment") or {"torch": data.get("torch")}
    lines = ["# R2 options on the demo", "",
             f"Unpruned accuracy {dense['value']:.3f} [{dense['ci95'][0]:.3f}, {dense['ci95'][1]:.3f}] on "
             f"{dense['n']} test sentences. \"vs default\": accuracy minus the default option's (sigma 1 x "
             "median distance, absolute stop) at the same budget, in points, paired over the same sentences "
             "[95% paired bootstrap interval], with McNemar's exact p.", "",
             "| sigma mode | sigma | stop rule | budget | R2 iterations per layer | R2 time (s) | accuracy [95% CI] | agreement | vs default |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        a, g = r["accuracy"], r["agreement"]
        lines.append(f"| {r['sigma_mode']} | {r['sigma']} | {r['stop_rule']} | {r['budget']} | "
                     f"{r['r2_iterations']} | {r['r2_seconds']:.1f} | {a['value']:.3f} "
                     f"[{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] | {g['value']:.3f} | {_vs_default(r)} |")
    if "cpu" in env:
        lines += ["", machine_line(env), f"Command: `{env['command']}`."]
    else:
        lines += ["", f"Machine: not recorded by the run that wrote this file (torch {env.get('torch')}); "
                  "load unknown."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

"""Which R2 options should be the default? KCM on the demo under each open choice of METHOD.md.

For each (sigma mode, sigma, stop rule): R2 iterations per layer, R2 wall time, and the accuracy and
agreement of KCM (R2 x D2, scaled) on the 800 test sentences at the given budgets. The unlabeled
sample is the demo's train split (2048 sentences), one seed: the options are deterministic.

    python benchmarks/bench_r2_options.py [--budgets 0.6 0.7]

Writes benchmarks/results/r2_options.json and r2_options.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kcm_core import demo  # noqa: E402
from kcm_core.data import make_batches  # noqa: E402
from kcm_core.evaluate import evaluate_classifier  # noqa: E402
from kcm_core.hull import HullConfig  # noqa: E402
from kcm_core.models import load_model  # noqa: E402
from kcm_core.pipeline import PruneConfig, compute_scores, prune  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OPTIONS = [
    ("median", 1.0, "absolute"),
    ("median", 0.5, "absolute"),
    ("fixed", 1.0, "absolute"),
    ("median", 1.0, "signed"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budgets", type=float, nargs="+", default=[0.6, 0.7])
    parser.add_argument("--samples", type=int, default=2048)
    args = parser.parse_args()
    if not demo.demo_ready():
        sys.exit("the demo is not prepared: run `python -m kcm_core demo prepare` first")
    summary = demo.prepare_demo()
    model, tokenizer = load_model(str(summary["model_dir"]))
    train = demo.load_demo_split("train")
    train = train.subset(list(range(min(args.samples, len(train)))))
    unlabeled = make_batches(train, tokenizer, max_len=64, batch_size=64, with_labels=False)
    test = make_batches(demo.load_demo_split("test"), tokenizer, max_len=64, batch_size=64)
    dense = evaluate_classifier(model, test)
    rows = []
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
            rows.append({"sigma_mode": mode, "sigma": sigma, "stop_rule": rule, "budget": budget,
                         "r2_iterations": scores.details.r2_iterations, "r2_seconds": r2_seconds,
                         "accuracy": ev.accuracy.to_dict(), "agreement": ev.agreement.to_dict()})
            print(f"{mode} sigma={sigma} {rule} budget={budget}: acc {ev.accuracy.value:.3f} "
                  f"iters {scores.details.r2_iterations}", file=sys.stderr, flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = {"dense_accuracy": dense.accuracy.to_dict(), "rows": rows, "torch": torch.__version__}
    (RESULTS / "r2_options.json").write_text(json.dumps(out, indent=2))
    lines = [f"Unpruned accuracy {dense.accuracy.value:.3f} "
             f"[{dense.accuracy.low:.3f}, {dense.accuracy.high:.3f}] on {dense.accuracy.n} test sentences.", "",
             "| sigma mode | sigma | stop rule | budget | R2 iterations per layer | R2 time (s) | accuracy [95% CI] | agreement |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, g = r["accuracy"], r["agreement"]
        lines.append(f"| {r['sigma_mode']} | {r['sigma']} | {r['stop_rule']} | {r['budget']} | "
                     f"{r['r2_iterations']} | {r['r2_seconds']:.1f} | {a['value']:.3f} "
                     f"[{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}] | {g['value']:.3f} |")
    (RESULTS / "r2_options.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Does the classifier default need 2048 unlabeled texts, or do 512 give the same plan quality?

The paper reports that 512 to 4096 unlabeled samples give the same accuracy (within 0.3 points). D2's
pass over the sample is a third of the classifier default's whole run at 2048 texts
(``results/default_run.md``), so the sample size decides whether that run fits in a minute. This script
prunes each task's model with ``--method`` on ``--samples`` texts (the seed's draw, as the CLI's
``--samples`` draws it; the scaling step keeps its 512) and pairs every row, per text, with the quality
benchmark's stored row for the same method, seed and budget at 2048 texts: accuracy and agreement with
the unpruned model, seed-averaged per-text difference with a paired bootstrap interval.

    python benchmarks/bench_sample_size.py --tasks polarity --budgets 0.9,0.8,0.7,0.6,0.5 --seeds 0,1,2

Only the demo's quality rows (``quality.json``) were measured at 2048 texts; hedge's and fine foods'
at 256, so they have no 2048 row to pair with. Needs the demo (``python -m kcm_core demo prepare``) and
its stored quality rows. Writes benchmarks/results/sample_size.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kcm_core.evaluate import bootstrap_interval, evaluate_classifier  # noqa: E402
from bench_quality import load_task, pruned_rows, results_path  # noqa: E402
from classifier_default import hits  # noqa: E402
from common import machine_line, run_environment, write_results  # noqa: E402

STEM = "sample_size"


def paired(rows: list[dict], stored: list[dict], budget: float, key: str) -> dict | None:
    """This run's rows minus the stored rows at ``budget``, over the seeds both have."""
    mine = {r["seed"]: r for r in rows if r["budget"] == budget}
    ref = {r["seed"]: r for r in stored if r["budget"] == budget}
    seeds = sorted(set(mine) & set(ref))
    if not seeds:
        return None
    diff = np.mean([hits(mine[s], key) - hits(ref[s], key) for s in seeds], axis=0)
    lo, hi = bootstrap_interval(diff, seed=0)
    return {"seeds": seeds, "difference": float(diff.mean()), "ci95": [lo, hi],
            "mine": float(np.mean([hits(mine[s], key).mean() for s in seeds])),
            "stored": float(np.mean([hits(ref[s], key).mean() for s in seeds]))}


def _cell(c: dict | None) -> str:
    if c is None:
        return ""
    lo, hi = c["ci95"]
    text = f"{100 * c['mine']:.1f} vs {100 * c['stored']:.1f}: {100 * c['difference']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return f"**{text}**" if lo > 0 or hi < 0 else text


def markdown(data: dict) -> str:
    s = data["settings"]
    budgets = s["budgets"]
    lines = [f"# Unlabeled sample size: {s['samples']} texts against 2048", "",
             f"`{s['method']}` on each task's model with {s['samples']} unlabeled texts (seeds "
             f"{', '.join(map(str, s['seeds']))}), paired per text with the quality benchmark's stored rows at 2048 "
             "(same method, seed and budget; `bench_quality.py`). Each cell: "
             f"{s['samples']} vs 2048 (percent, mean over seeds): difference in points [paired 95% bootstrap "
             "interval of the seed-averaged per-text difference]; **bold**: the interval excludes 0.", "",
             "| task | measure | " + " | ".join(str(b) for b in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for task, t in data["tasks"].items():
        for key, label in (("hits", "accuracy"), ("agree", "agreement")):
            lines.append(f"| {task} | {label} | " + " | ".join(_cell(t[key].get(str(b))) for b in budgets) + " |")
    lines += ["", "D2 seconds (mean over seeds; this run on a shared machine, the stored rows as recorded): " +
              "; ".join(f"{task} {t['d2_seconds']:.1f} s at {s['samples']}, {t['stored_d2_seconds']:.1f} s at 2048"
                        for task, t in data["tasks"].items()) + ".", "",
              machine_line(data["environment"]), f"Command: `{s['command']}`; wall time {data['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="polarity")
    parser.add_argument("--method", default="kcm")
    parser.add_argument("--budgets", default="0.9,0.8,0.7,0.6,0.5")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    budgets = [float(b) for b in args.budgets.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    load_before, started = os.getloadavg(), time.perf_counter()
    from kcm_core.data import make_batches
    from kcm_core.models import load_model
    out = {}
    for name in args.tasks.split(","):
        task = load_task(name)
        stored = json.loads(results_path(name, False).read_text())
        if stored["settings"]["samples"] != 2048:
            raise SystemExit(f"{name}: its stored quality rows were measured at {stored['settings']['samples']} "
                             "texts, not 2048: there is nothing to pair with (polarity has 2048)")
        ref = [r for r in stored["rows"] if r["method"] == args.method]
        model, tokenizer = load_model(task["model_dir"], device="cpu")
        test = task["test"].subset(range(stored["settings"]["test"]))
        test_batches = make_batches(test, tokenizer, max_len=task["max_len"], batch_size=64)
        dense = evaluate_classifier(model, test_batches, seed=0)
        if "".join(map(str, (dense.predictions == torch.tensor(test.labels)).int().tolist())) != stored["unpruned"]["hits"]:
            raise SystemExit(f"{name}: the unpruned model's test hits differ from the stored run's")
        rows = [row for row, _ in pruned_rows(model, tokenizer, task["train"], test_batches, test.labels,
                                              dense.predictions, methods=[args.method], budgets=budgets,
                                              seeds=seeds, samples=args.samples, labeled=512,
                                              scale_samples=min(512, args.samples), max_len=task["max_len"],
                                              batch_size=64)]
        d2 = [r["seconds"].get("stage_d2", 0.0) for r in rows if r["budget"] == budgets[0]]
        stored_d2 = [r["seconds"].get("stage_d2", 0.0) for r in ref if r["budget"] == budgets[0] and r["seed"] in seeds]
        out[name] = {"hits": {str(b): paired(rows, ref, b, "hits") for b in budgets},
                     "agree": {str(b): paired(rows, ref, b, "agree") for b in budgets},
                     "d2_seconds": float(np.mean(d2)), "stored_d2_seconds": float(np.mean(stored_d2)),
                     "rows": [{k: r[k] for k in ("seed", "budget", "accuracy", "agreement", "hits", "agree",
                                                 "relative_flops", "seq_len", "kept_per_layer", "seconds")}
                              for r in rows]}
        print(f"{name}: {json.dumps({k: out[name][k] for k in ('hits', 'agree')})}", file=sys.stderr, flush=True)
    data = {"settings": {"method": args.method, "samples": args.samples, "budgets": budgets, "seeds": seeds,
                         "command": " ".join(["python"] + sys.argv)},
            "tasks": out, "environment": run_environment(load_before, threads=args.threads),
            "wall_seconds": time.perf_counter() - started}
    print(write_results(STEM, data, markdown(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

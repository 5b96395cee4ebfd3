"""Accuracy of every pruning method at five FLOPs budgets on the demo, over seeds, with intervals.

The demo model (MiniLM-L6 fine-tuned on movie-review polarity) is pruned by every method in
``kcm_core.methods.METHODS`` at relative FLOPs 0.9 ... 0.5 (counted at the unlabeled sample's average
length). Per seed: the unlabeled sample is 2048 demo train sentences (all, if fewer), the same subset
``python -m kcm_core prune --samples`` draws (``TextData.sample``) but in the order it was drawn
(``shuffled=True``); its first 512 with their labels are the labeled set of the label-using methods;
the seed is also the method's own seed (random scores). Scores are computed once per method and
seed and reused for every budget (they do not depend on it). Accuracy and agreement with the unpruned
model are measured on the 800 test sentences.

Per method and budget the results give the mean over seeds, the spread between seeds (min to max,
standard deviation), and a 95% bootstrap interval over test sentences (``kcm_core.evaluate``) of the
seed-averaged accuracy. Separate intervals that overlap do not show "no difference": compare two
methods on the same sentences paired (``kcm_core.evaluate.paired_difference``).
The paper's BERT-base / SST-2 numbers at 0.6 are quoted beside for context only (different model,
data and sequence length).

    python benchmarks/bench_quality.py [--methods kcm,random] [--budgets 0.6] [--seeds 0,1,2] [--quick]
                                       [--merge]

It needs the prepared demo (``python -m kcm_core demo prepare``) and exits with code 2 without it.
Writes benchmarks/results/quality.json and quality.md (``--quick``: quality-quick.*); ``--merge``
keeps the rows of an earlier run for other (method, budget, seed) combinations, so seeds can be
added in later runs. Progress on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

# Passive OpenMP waiting: on a shared 2-core machine spinning threads stall each other (see bench_speed).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kcm_core.arch import model_shape  # noqa: E402
from kcm_core.evaluate import bootstrap_interval, evaluate_classifier  # noqa: E402
from kcm_core.flops import relative_flops  # noqa: E402
from kcm_core.report import Environment  # noqa: E402
from kcm_core.methods import METHODS, method  # noqa: E402
from kcm_core.pipeline import PruneConfig, compute_scores, prune  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5)
SEEDS = (0, 1, 2)
HEADLINE = 0.6
# METHOD.md: BERT-base on SST-2 (GLUE dev), 60% of FLOPs kept, accuracy in percent.
PAPER_SST2_AT_06 = {"unpruned": 93.57, "kcm": 91.11, "mask-tuning": 92.47, "weight-magnitude": 69.8,
                    "r2": 89.3, "d2": 87.5}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quiet_progress(msg: str, frac: float) -> None:
    if frac == 0.0 and ":" not in msg:
        log(f"      {msg}")


def parse_list(text: str, kind):
    return [kind(x) for x in text.split(",") if x.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list (default: all)")
    parser.add_argument("--budgets", default=None, help="comma list of relative FLOPs (default 0.9,...,0.5)")
    parser.add_argument("--seeds", default=None, help="comma list (default 0,1,2)")
    parser.add_argument("--quick", action="store_true",
                        help="budget 0.6, seed 0, 256 unlabeled / 128 labeled / 200 test sentences")
    parser.add_argument("--merge", action="store_true", help="keep earlier rows for other combinations")
    parser.add_argument("--samples", type=int, default=None, help="unlabeled sentences (default 2048)")
    parser.add_argument("--labeled", type=int, default=None, help="labeled sentences (default 512)")
    parser.add_argument("--test", type=int, default=None, help="test sentences (default 800: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from kcm_core import demo
    if not demo.demo_ready():
        log("bench_quality needs the prepared demo model and data, and they are not there "
            f"({demo.demo_dir()}). Run `python -m kcm_core demo prepare` first.")
        return 2
    methods = parse_list(args.methods, str)
    for name in methods:
        method(name)                                   # unknown names fail before any work
    budgets = parse_list(args.budgets, float) if args.budgets else ([HEADLINE] if args.quick else list(BUDGETS))
    seeds = parse_list(args.seeds, int) if args.seeds else ([0] if args.quick else list(SEEDS))
    samples = args.samples or (256 if args.quick else 2048)
    labeled_n = args.labeled or (128 if args.quick else 512)
    test_n = args.test or (200 if args.quick else 800)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()

    from kcm_core.data import make_batches
    from kcm_core.models import load_model
    summary = demo.prepare_demo()
    model, tokenizer = load_model(summary["model_dir"], device="cpu")
    max_len = demo.FINETUNE.max_len
    train, test = demo.load_demo_split("train"), demo.load_demo_split("test")
    test = test.subset(range(min(test_n, len(test))))
    test_batches = make_batches(test, tokenizer, max_len=max_len, batch_size=64)
    log(f"unpruned model on {len(test)} test sentences")
    dense = evaluate_classifier(model, test_batches, seed=0)
    dense_hits = (dense.predictions == torch.tensor(test.labels)).int()
    shape = model_shape(model.config)

    rows = []
    for seed in seeds:
        # The CLI's --samples subset, in the order it was drawn: scaling uses its first 512 and the
        # label-using methods its first `labeled_n` (the order the published results were made with).
        sample = train.sample(samples, seed, shuffled=True)
        unlabeled = make_batches(sample, tokenizer, max_len=max_len, batch_size=64, with_labels=False)
        labeled = make_batches(sample.subset(range(min(labeled_n, len(sample)))), tokenizer,
                               max_len=max_len, batch_size=32)
        for name in methods:
            spec = method(name)
            config = PruneConfig(method=name, budget=budgets[0], seed=seed,
                                 scale_samples=min(512, len(sample)), label_samples=labeled_n)
            log(f"seed {seed}, {name}: scoring")
            t = time.perf_counter()
            scores = compute_scores(model, config, unlabeled, labeled if spec.uses_labels else None,
                                    progress=quiet_progress)
            score_s = time.perf_counter() - t
            for budget in budgets:
                t = time.perf_counter()
                result = prune(model, replace(config, budget=budget), unlabeled,
                               labeled if spec.uses_labels else None, method_scores=scores)
                prune_s = time.perf_counter() - t
                t = time.perf_counter()
                ev = evaluate_classifier(result.model, test_batches, reference=dense.predictions, seed=0)
                eval_s = time.perf_counter() - t
                hits = (ev.predictions == torch.tensor(test.labels)).int()
                rows.append({
                    "method": name, "seed": seed, "budget": budget,
                    "accuracy": ev.accuracy.to_dict(), "agreement": ev.agreement.to_dict(),
                    "hits": "".join(map(str, hits.tolist())),
                    "agree": "".join(map(str, (ev.predictions == dense.predictions).int().tolist())),
                    "relative_flops": relative_flops(shape, result.seq_len, result.plan.kept_counts),
                    "seq_len": result.seq_len, "kept_per_layer": result.plan.kept_counts,
                    "seconds": {"scoring": score_s, "pruning": prune_s, "evaluation": eval_s,
                                **{f"stage_{k}": v for k, v in result.seconds.items()}},
                    "details": {k: v for k, v in result.details.to_dict().items() if k != "r2_sigma"},
                    "scaling": {"scaled_layers": result.plan.info.scaled_layers,
                                "scaling_stopped_at": result.plan.info.scaling_stopped_at},
                })
                log(f"    {name} @ {budget}: accuracy {ev.accuracy.value:.4f} "
                    f"(agreement {ev.agreement.value:.4f}) [{score_s:.0f}s scoring, {prune_s:.0f}s pruning]")
                del result

    out_path = RESULTS / ("quality-quick.json" if args.quick else "quality.json")
    settings = {"samples": samples, "labeled": labeled_n, "test": len(test), "max_len": max_len,
                "scale_samples": min(512, samples), "model_dir": summary["model_dir"]}
    if args.merge and out_path.exists():
        old = json.loads(out_path.read_text())
        if old.get("settings", {}) == settings:
            keys = {(r["method"], r["budget"], r["seed"]) for r in rows}
            rows = [r for r in old["rows"] if (r["method"], r["budget"], r["seed"]) not in keys] + rows
        else:
            log("--merge: the earlier run used other settings; its rows are not kept")
    data = {
        "settings": settings,
        "unpruned": {"accuracy": dense.accuracy.to_dict(), "hits": "".join(map(str, dense_hits.tolist()))},
        "environment": {**asdict(Environment.here()), "threads": args.threads,
                        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
        "paper_bert_base_sst2_at_0.6": PAPER_SST2_AT_06,
        "rows": rows,
        "summary": summarise(rows),
        "wall_seconds_this_run": time.perf_counter() - started,
    }
    RESULTS.mkdir(exist_ok=True)
    out_path.write_text(json.dumps(data, indent=1) + "\n")
    out_path.with_suffix(".md").write_text(markdown(data, args.quick))
    log(f"wrote {out_path} and {out_path.with_suffix('.md').name} "
        f"in {data['wall_seconds_this_run']:.0f} s")
    return 0


def summarise(rows: list[dict]) -> list[dict]:
    """Per (method, budget): mean and spread over seeds, bootstrap CI of the seed-averaged accuracy."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    out = []
    for (name, budget), rs in sorted(groups.items(), key=lambda kv: (list(METHODS).index(kv[0][0]), -kv[0][1])):
        accs = [r["accuracy"]["value"] for r in rs]
        agrees = [r["agreement"]["value"] for r in rs]
        hits = torch.tensor([[int(c) for c in r["hits"]] for r in rs], dtype=torch.float64).mean(0)
        agree = torch.tensor([[int(c) for c in r["agree"]] for r in rs], dtype=torch.float64).mean(0)
        out.append({
            "method": name, "label": METHODS[name].label, "budget": budget,
            "seeds": sorted(r["seed"] for r in rs),
            "accuracy_mean": statistics.fmean(accs),
            "accuracy_sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "accuracy_min": min(accs), "accuracy_max": max(accs),
            "accuracy_ci95": list(bootstrap_interval(hits, seed=0)),
            "agreement_mean": statistics.fmean(agrees),
            "agreement_ci95": list(bootstrap_interval(agree, seed=0)),
            "relative_flops_mean": statistics.fmean(r["relative_flops"] for r in rs),
            "seq_len_mean": statistics.fmean(r["seq_len"] for r in rs),
            "scoring_seconds_mean": statistics.fmean(r["seconds"]["scoring"] for r in rs),
            "pruning_seconds_mean": statistics.fmean(r["seconds"]["pruning"] for r in rs),
            # what one user waits for this one model: scoring plus selection, scaling, slicing
            "seconds_this_budget_mean": statistics.fmean(r["seconds"]["scoring"] + r["seconds"]["pruning"]
                                                         for r in rs),
        })
    return out


def method_wall_time(rows: list[dict], name: str) -> float:
    """Mean over seeds of (scoring once + selection/scaling/slicing at every budget) for one method."""
    per_seed: dict[int, float] = {}
    for r in rows:
        if r["method"] == name:
            per_seed.setdefault(r["seed"], r["seconds"]["scoring"])
            per_seed[r["seed"]] += r["seconds"]["pruning"]
    return statistics.fmean(per_seed.values()) if per_seed else float("nan")


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def markdown(data: dict, quick: bool) -> str:
    summary, rows, s = data["summary"], data["rows"], data["settings"]
    dense = data["unpruned"]["accuracy"]
    budgets = sorted({r["budget"] for r in summary}, reverse=True)
    methods = [m for m in METHODS if any(r["method"] == m for r in summary)]
    seeds = sorted({r["seed"] for r in rows})
    seq = statistics.fmean(r["seq_len"] for r in rows) if rows else float("nan")
    lines = [
        "# Quality: every method at every budget on the demo", "",
        f"Demo model (MiniLM-L6 fine-tuned on sentence polarity), {s['test']} test sentences; unlabeled "
        f"sample {s['samples']} train sentences (seed-dependent order), {s['labeled']} of them labeled for "
        f"the label-using methods, scaling on {s['scale_samples']}; max length {s['max_len']} tokens. "
        f"Seeds {seeds}. Budgets are relative FLOPs (encoder MACs) at the unlabeled sample's average "
        f"length, {seq:.1f} tokens.", "",
        "Accuracy in percent: mean over seeds, [95% bootstrap interval over test sentences of the "
        "seed-averaged accuracy], and the spread between seeds (min to max). One standard error of an "
        f"accuracy on {s['test']} sentences is about {100 * (0.25 / max(1, s['test'])) ** 0.5:.1f} points "
        "or less; overlapping intervals mean no demonstrated difference.", "",
        f"Unpruned: {pct(dense['value'])} [{pct(dense['ci95'][0])}, {pct(dense['ci95'][1])}].", "",
    ]
    if HEADLINE in budgets:
        kcm = next((r for r in summary if r["method"] == "kcm" and r["budget"] == HEADLINE), None)
        lines += [f"## At {HEADLINE} of FLOPs", "",
                  "| method | accuracy | 95% CI | seeds min-max | agreement with unpruned | interval overlaps KCM's | wall time to prune (s) | paper, BERT-base SST-2 |",
                  "|---|---|---|---|---|---|---|---|",
                  f"| unpruned | {pct(dense['value'])} | {pct(dense['ci95'][0])}-{pct(dense['ci95'][1])} | | 100 | "
                  f"{'yes' if kcm and _overlap(dense['ci95'], kcm['accuracy_ci95']) else 'no' if kcm else ''} | | "
                  f"{PAPER_SST2_AT_06['unpruned']} |"]
        for r in summary:
            if r["budget"] != HEADLINE:
                continue
            overlap = "" if kcm is None or r["method"] == "kcm" else \
                ("yes" if _overlap(r["accuracy_ci95"], kcm["accuracy_ci95"]) else "no")
            lines.append(
                f"| {r['label']} | {pct(r['accuracy_mean'])} | {pct(r['accuracy_ci95'][0])}-{pct(r['accuracy_ci95'][1])} | "
                f"{pct(r['accuracy_min'])}-{pct(r['accuracy_max'])} | {pct(r['agreement_mean'])} | {overlap} | "
                f"{r['seconds_this_budget_mean']:.0f} | "
                f"{PAPER_SST2_AT_06.get(r['method'], '')} |")
        lines += ["", "Paper column: Nova et al. 2023, BERT-base on SST-2 at 60% FLOPs (context only: a "
                  "bigger model, another data set, sequence length 25.2).", ""]
    lines += ["## Accuracy by budget", "",
              "| method | " + " | ".join(str(b) for b in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    for m in methods:
        cells = []
        for b in budgets:
            r = next((x for x in summary if x["method"] == m and x["budget"] == b), None)
            cells.append("" if r is None else
                         f"{pct(r['accuracy_mean'])} [{pct(r['accuracy_ci95'][0])}, {pct(r['accuracy_ci95'][1])}]"
                         + (f" ({pct(r['accuracy_min'])}-{pct(r['accuracy_max'])})" if len(r["seeds"]) > 1 else ""))
        lines.append(f"| {METHODS[m].label} | " + " | ".join(cells) + " |")
    lines += ["", "## Wall time per method (s, mean over seeds)", "",
              "Scoring once, then selection, scaling and slicing at every budget; evaluation excluded.", "",
              "| method | scoring | all budgets (total) |", "|---|---|---|"]
    for m in methods:
        score = statistics.fmean(r["seconds"]["scoring"] for r in rows if r["method"] == m and
                                 r["budget"] == max(x["budget"] for x in rows if x["method"] == m))
        lines.append(f"| {METHODS[m].label} | {score:.0f} | {method_wall_time(rows, m):.0f} |")
    lines += ["", f"Regenerate: `python benchmarks/bench_quality.py{' --quick' if quick else ''}`.", ""]
    return "\n".join(lines)


def _overlap(a, b) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


if __name__ == "__main__":
    sys.exit(main())

"""Accuracy of every pruning method at five FLOPs budgets on one task, over seeds, paired against KCM.

Tasks (``--task``): ``polarity``, the demo (MiniLM-L6 fine-tuned on movie-review sentence polarity,
``python -m kcm_core demo prepare``); ``fine-foods`` and ``hedge``, the demo's encoder fine-tuned on
Amazon Fine Food reviews and on CoNLL-2010 hedge sentences (``python benchmarks/prepare_tasks.py``;
``kcm_core.demos.tasks``). The task's model is pruned by every method in ``kcm_core.methods.METHODS`` at
relative FLOPs 0.9 ... 0.5 (counted at the unlabeled sample's average length). Per seed: the unlabeled
sample is 2048 train texts (all, if fewer), the same subset ``python -m kcm_core prune --samples`` draws
(``TextData.sample``) but in the order it was drawn (``shuffled=True``); its first 512 with their labels
are the labeled set of the label-using methods; the seed is also the method's own seed (random scores).
Scores are computed once per method and seed and reused for every budget (they do not depend on it).
Accuracy and agreement with the unpruned model are measured on the task's test split.

Every method is compared with KCM on the same test texts, paired: per seed (the same unlabeled sample
for both), the difference in accuracy with a seeded paired bootstrap interval over test texts and
McNemar's exact p (``kcm_core.evaluate.paired_difference``); across seeds, the mean of those
differences with the paired interval of the seed-averaged per-text difference. The spread between
seeds (min to max of accuracy, and of the per-seed differences) is shown beside it, not folded in.
For polarity the paper's BERT-base / SST-2 numbers at 0.6 are quoted for context only (different
model, data and sequence length).

    python benchmarks/bench_quality.py [--task polarity|fine-foods|hedge] [--methods kcm,random]
                                       [--budgets 0.6] [--seeds 0,1,2] [--quick] [--merge]

It exits with code 2 when the task is not prepared, saying what to run. Writes
benchmarks/results/quality.json and quality.md for polarity, quality-<task>.* for the others
(``--quick``: ...-quick.*); ``--merge`` keeps the rows of an earlier run for other (method, budget,
seed) combinations, so seeds and methods can be added in later runs. Progress on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
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
from kcm_core.evaluate import bootstrap_interval, evaluate_classifier, paired_difference  # noqa: E402
from kcm_core.flops import relative_flops  # noqa: E402
from kcm_core.methods import METHODS, method  # noqa: E402
from kcm_core.pipeline import compute_scores, prune  # noqa: E402
from common import cell_config, cell_label, cell_method, run_environment  # noqa: E402
from quality_tables import HEADLINE, REFERENCE, accuracy_cell, p_cell, paired_cell, pct, spread_cell  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5)
SEEDS = (0, 1, 2)
TASKS = ("polarity", "fine-foods", "hedge")
# docs/method.md: BERT-base on SST-2 (GLUE dev), 60% of FLOPs kept, accuracy in percent.
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
    parser.add_argument("--task", default="polarity", choices=TASKS, help="default: polarity (the demo)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma list of methods, or cells score/allocation/repair/target (default: every method)")
    parser.add_argument("--budgets", default=None, help="comma list of relative FLOPs (default 0.9,...,0.5)")
    parser.add_argument("--seeds", default=None, help="comma list (default 0,1,2)")
    parser.add_argument("--quick", action="store_true",
                        help="budget 0.6, seed 0, 256 unlabeled / 128 labeled / 200 test texts")
    parser.add_argument("--merge", action="store_true", help="keep earlier rows for other combinations")
    parser.add_argument("--samples", type=int, default=None, help="unlabeled texts (default 2048)")
    parser.add_argument("--labeled", type=int, default=None, help="labeled texts (default 512)")
    parser.add_argument("--test", type=int, default=None, help="test texts (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--report-only", action="store_true",
                        help="recompute the summary and tables of the existing results file, run nothing")
    args = parser.parse_args()
    if args.report_only:
        return report_only(args.task, args.quick)

    try:
        task = load_task(args.task)
    except ValueError as err:
        log(f"bench_quality --task {args.task}: {err}")
        return 2
    methods = parse_list(args.methods, str)
    for name in methods:
        cell_config(name)                              # unknown names fail before any work
    if REFERENCE not in methods:
        log(f"note: {REFERENCE} is not among the methods; the paired columns use its rows from --merge")
    budgets = parse_list(args.budgets, float) if args.budgets else ([HEADLINE] if args.quick else list(BUDGETS))
    seeds = parse_list(args.seeds, int) if args.seeds else ([0] if args.quick else list(SEEDS))
    samples = args.samples or (256 if args.quick else 2048)
    labeled_n = args.labeled or (128 if args.quick else 512)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()

    from kcm_core.data import make_batches
    from kcm_core.models import load_model
    model, tokenizer = load_model(task["model_dir"], device="cpu")
    max_len = task["max_len"]
    train, test = task["train"], task["test"]
    test_n = args.test or (200 if args.quick else len(test))
    test = test.subset(range(min(test_n, len(test))))
    test_batches = make_batches(test, tokenizer, max_len=max_len, batch_size=64)
    log(f"{args.task}: unpruned model on {len(test)} test texts")
    dense = evaluate_classifier(model, test_batches, seed=0)
    dense_hits = (dense.predictions == torch.tensor(test.labels)).int()

    out_path = results_path(args.task, args.quick)
    settings = {"task": args.task, "task_description": task["description"], "samples": samples,
                "labeled": labeled_n, "test": len(test), "max_len": max_len,
                "scale_samples": min(512, samples), "model_dir": task["model_dir"],
                "model_test_accuracy_at_preparation": task["prepared_accuracy"]}
    kept = earlier_rows(out_path, settings) if args.merge else []
    data = {
        "command": " ".join(["python", "benchmarks/bench_quality.py", *sys.argv[1:]]),
        "settings": settings,
        "unpruned": {"accuracy": dense.accuracy.to_dict(), "hits": "".join(map(str, dense_hits.tolist()))},
        "environment": run_environment(load_before, threads=args.threads,
                                       omp_wait_policy=os.environ.get("OMP_WAIT_POLICY")),
        "paper_bert_base_sst2_at_0.6": PAPER_SST2_AT_06 if args.task == "polarity" else None,
        "rows": kept,
    }
    rows = []
    for row, result in pruned_rows(model, tokenizer, train, test_batches, test.labels, dense.predictions,
                                   methods=methods, budgets=budgets, seeds=seeds, samples=samples,
                                   labeled=labeled_n, scale_samples=settings["scale_samples"],
                                   max_len=max_len, batch_size=64):
        del result
        rows.append(row)
        done = {(r["method"], r["budget"], r["seed"]) for r in rows}
        data["rows"] = [r for r in kept if (r["method"], r["budget"], r["seed"]) not in done] + rows
        data["environment"].update(run_environment(load_before, threads=args.threads,
                                                   omp_wait_policy=os.environ.get("OMP_WAIT_POLICY")))
        data["wall_seconds_this_run"] = time.perf_counter() - started
        save(out_path, data, args.quick)
    log(f"wrote {out_path} and {out_path.with_suffix('.md').name} in {data['wall_seconds_this_run']:.0f} s")
    return 0


def pruned_rows(model, tokenizer, train, test_batches, test_labels, dense_predictions, *, methods, budgets,
                seeds, samples: int, labeled: int, scale_samples: int, max_len: int, batch_size: int):
    """Prune ``model`` with every method at every budget for every seed and evaluate each pruned model:
    yields ``(measured_row, PruneResult)`` in seed, method, budget order (a caller saves as it goes).

    Per seed, the unlabeled sample is ``train.sample(samples, seed)`` in the order it was drawn (the
    CLI's ``--samples`` subset): scaling uses its first ``scale_samples`` and the label-using methods
    its first ``labeled``. R2 depends on the weights alone: computed once and reused by every seed and
    method; the D2 statistics and the gradients once per seed, shared by the methods using them. A
    row's scoring time is what its method computed itself; its ``reused`` names what it found computed.
    """
    from kcm_core.data import make_batches
    shape = model_shape(model.config)
    run_r2: dict = {}
    for seed in seeds:
        sample = train.sample(samples, seed, shuffled=True)
        unlabeled = make_batches(sample, tokenizer, max_len=max_len, batch_size=batch_size, with_labels=False)
        labeled_batches = make_batches(sample.subset(range(min(labeled, len(sample)))), tokenizer,
                                       max_len=max_len, batch_size=32)
        shared = dict(run_r2)
        for name in methods:
            spec = method(cell_method(name))
            config = cell_config(name, budget=budgets[0], seed=seed, scale_samples=scale_samples,
                                 label_samples=labeled)
            log(f"seed {seed}, {name}: scoring")
            reused = sorted(set(shared) & spec.needs)
            with_labels = labeled_batches if spec.uses_labels else None
            t = time.perf_counter()
            scores = compute_scores(model, config, unlabeled, with_labels, progress=quiet_progress, shared=shared)
            score_s = time.perf_counter() - t
            run_r2.update({k: v for k, v in shared.items() if k == "r2"})
            for budget in budgets:
                t = time.perf_counter()
                result = prune(model, replace(config, budget=budget), unlabeled, with_labels, method_scores=scores)
                prune_s = time.perf_counter() - t
                row = measured_row(name, seed, budget, result, test_batches, test_labels, dense_predictions,
                                   shape, score_s, prune_s)
                row["reused"] = reused
                log(f"    {name} @ {budget}: accuracy {row['accuracy']['value']:.4f} (agreement "
                    f"{row['agreement']['value']:.4f}) [{score_s:.0f} s scoring, {prune_s:.0f} s pruning, "
                    f"{row['seconds']['evaluation']:.0f} s evaluation]")
                yield row, result


def measured_row(name: str, seed: int, budget: float, result, test_batches, labels, dense_predictions,
                 shape, score_s: float, prune_s: float) -> dict:
    """Evaluate one pruned model (``PruneResult``) on the test batches; the row every table is built
    from: accuracy and agreement with the unpruned predictions, and per-text hits and agreement as
    0/1 strings (what the paired comparisons are computed from), FLOPs, kept widths and times."""
    t = time.perf_counter()
    ev = evaluate_classifier(result.model, test_batches, reference=dense_predictions, seed=0)
    eval_s = time.perf_counter() - t
    hits = (ev.predictions == torch.tensor(labels)).int()
    return {
        "method": name, "seed": seed, "budget": budget,
        "accuracy": ev.accuracy.to_dict(), "agreement": ev.agreement.to_dict(),
        "hits": "".join(map(str, hits.tolist())),
        "agree": "".join(map(str, (ev.predictions == dense_predictions).int().tolist())),
        "relative_flops": relative_flops(shape, result.seq_len, result.plan.kept_counts),
        "seq_len": result.seq_len, "kept_per_layer": result.plan.kept_counts,
        "seconds": {"scoring": score_s, "pruning": prune_s, "evaluation": eval_s,
                    **{f"stage_{k}": v for k, v in result.seconds.items()}},
        "details": {k: v for k, v in result.details.to_dict().items() if k != "r2_sigma"},
        "scaling": {"scaled_layers": result.plan.info.scaled_layers,
                    "scaling_stopped_at": result.plan.info.scaling_stopped_at},
    }


def results_path(task: str, quick: bool) -> Path:
    stem = "quality" if task == "polarity" else f"quality-{task}"
    return RESULTS / (f"{stem}-quick.json" if quick else f"{stem}.json")


def earlier_rows(out_path: Path, settings: dict) -> list[dict]:
    """--merge: the rows of an earlier run with the same settings (others are dropped, with a note)."""
    if not out_path.exists():
        return []
    old = json.loads(out_path.read_text())
    earlier = old.get("settings", {})
    differ = sorted(k for k in set(earlier) | set(settings)
                    if k in earlier and k in settings and earlier[k] != settings[k])
    if differ or set(earlier) - set(settings):
        log(f"--merge: the earlier run used other settings ({', '.join(differ) or 'other fields'}); "
            "its rows are not kept")
        return []
    if set(settings) - set(earlier):       # fields recorded since: the earlier run did not write them
        log(f"--merge: the earlier run did not record {', '.join(sorted(set(settings) - set(earlier)))}; "
            "its other settings match, so its rows are kept")
    return old["rows"]


def save(out_path: Path, data: dict, quick: bool) -> None:
    """Write the JSON and the Markdown (after every method, so a long run that is stopped keeps its
    finished rows; the summary is recomputed from all rows each time)."""
    data["summary"] = summarise(data["rows"], torch.tensor([int(c) for c in data["unpruned"]["hits"]]))
    text = markdown(data, quick)
    RESULTS.mkdir(exist_ok=True)
    out_path.write_text(json.dumps(data, indent=1) + "\n")
    out_path.with_suffix(".md").write_text(text)


def report_only(task: str, quick: bool) -> int:
    """Recompute the summary and tables of an existing results file from its stored per-text hits (no
    model is run); results written before the paired columns existed get them this way."""
    out_path = results_path(task, quick)
    if not out_path.exists():
        log(f"--report-only: {out_path} does not exist; run the benchmark first")
        return 2
    data = json.loads(out_path.read_text())
    data["settings"].setdefault("task", task)
    if task == "polarity":
        data["settings"].setdefault("task_description", "demo: MiniLM-L6 fine-tuned on Pang & Lee sentence polarity")
    data.setdefault("command", "python benchmarks/bench_quality.py" + (" --quick" if quick else ""))
    data["report_regenerated"] = {
        "command": " ".join(["python", "benchmarks/bench_quality.py", *sys.argv[1:]]),
        "note": "summary and tables recomputed from the stored per-text hits of the rows; no model was run"}
    save(out_path, data, quick)
    log(f"rewrote {out_path.name} and {out_path.with_suffix('.md').name} from {len(data['rows'])} stored rows")
    return 0


def load_task(name: str) -> dict:
    """The task's model folder, splits, truncation length and description; ``ValueError`` when it is
    not prepared (saying what to run)."""
    if name == "polarity":
        from kcm_core.demos import classifier as demo
        if not demo.demo_ready():
            raise ValueError("the demo model and data are not prepared "
                             f"({demo.demo_dir()}); run `python -m kcm_core demo prepare` first")
        summary = demo.prepare_demo()
        return {"model_dir": summary["model_dir"], "train": demo.load_demo_split("train"),
                "test": demo.load_demo_split("test"), "max_len": demo.FINETUNE.max_len,
                "prepared_accuracy": summary["test_accuracy"],
                "description": "demo: MiniLM-L6 fine-tuned on Pang & Lee sentence polarity"}
    from kcm_core.demos import tasks
    spec, summary = tasks.task_spec(name), tasks.task_summary(name)
    return {"model_dir": summary["model_dir"], "train": tasks.load_task_split(name, "train"),
            "test": tasks.load_task_split(name, "test"), "max_len": spec.finetune.max_len,
            "prepared_accuracy": summary["test_accuracy"],
            "description": f"MiniLM-L6 fine-tuned on {spec.description}"}


def cell_order(cell: str) -> tuple[int, str]:
    """Rows sort by their score's place in the method table, then a method's own recipe before its cells."""
    return list(METHODS).index(cell_method(cell)), "" if "/" not in cell else cell


def hits_of(row: dict) -> torch.Tensor:
    return torch.tensor([int(c) for c in row["hits"]], dtype=torch.float64)


def paired_vs_reference(rows: list[dict], dense_hits: torch.Tensor) -> None:
    """Add ``vs_kcm`` to every row: its accuracy minus KCM's at the same budget and seed, on the same
    test texts (paired bootstrap interval, McNemar's exact p); ``unpruned_vs_kcm`` to KCM's rows; and
    ``vs_unpruned`` (pruned minus unpruned, paired the same way) to every row."""
    reference = {(r["budget"], r["seed"]): r for r in rows if r["method"] == REFERENCE}
    for r in rows:
        r["vs_unpruned"] = paired_difference(hits_of(r), dense_hits, seed=0).to_dict()
        ref = reference.get((r["budget"], r["seed"]))
        if ref is None:
            r.pop("vs_kcm", None)
            continue
        if r["method"] == REFERENCE:
            r["unpruned_vs_kcm"] = paired_difference(dense_hits, hits_of(ref), seed=0).to_dict()
        else:
            r["vs_kcm"] = paired_difference(hits_of(r), hits_of(ref), seed=0).to_dict()


def summarise(rows: list[dict], dense_hits: torch.Tensor) -> list[dict]:
    """Per (method, budget): mean and spread over seeds, bootstrap CI of the seed-averaged accuracy, and
    the paired comparison with KCM (per seed, and its seed average with the spread kept apart)."""
    paired_vs_reference(rows, dense_hits)
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    out = []
    for (name, budget), rs in sorted(groups.items(), key=lambda kv: (*cell_order(kv[0][0]), -kv[0][1])):
        accs = [r["accuracy"]["value"] for r in rs]
        agrees = [r["agreement"]["value"] for r in rs]
        hits = torch.tensor([[int(c) for c in r["hits"]] for r in rs], dtype=torch.float64).mean(0)
        agree = torch.tensor([[int(c) for c in r["agree"]] for r in rs], dtype=torch.float64).mean(0)
        out.append({
            "method": name, "label": cell_label(name), "budget": budget,
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
            "vs_kcm": _paired_summary(rs, "vs_kcm", lambda r: hits_of(r), groups.get((REFERENCE, budget))),
            "unpruned_vs_kcm": _paired_summary(rs, "unpruned_vs_kcm", lambda r: dense_hits, rs),
            "vs_unpruned": _paired_summary(rs, "vs_unpruned", hits_of, None, reference_hits=lambda r: dense_hits),
        })
    return out


def _paired_summary(rs: list[dict], key: str, hits, reference_rows: list[dict] | None,
                    reference_hits=None) -> dict | None:
    """Seeds with a paired result under ``key``: each seed's difference, interval and p; their mean;
    the paired bootstrap interval of the seed-averaged per-text difference (the seeds averaged inside
    each text, so the interval is over test texts only); the spread of the per-seed differences.
    The reference is the row of the same seed in ``reference_rows``, or ``reference_hits(row)``."""
    paired = sorted((r for r in rs if key in r), key=lambda r: r["seed"])
    if not paired or (reference_rows is None and reference_hits is None):
        return None
    if reference_hits is None:
        ref = {r["seed"]: r for r in reference_rows}
        reference_hits = lambda r: hits_of(ref[r["seed"]])      # noqa: E731
    diff = torch.stack([hits(r) - reference_hits(r) for r in paired]).mean(0)      # (texts,)
    values = [r[key]["value"] for r in paired]
    return {
        "seeds": [r["seed"] for r in paired],
        "difference_mean": statistics.fmean(values),
        "ci95_seed_averaged": list(bootstrap_interval(diff, seed=0)),
        "difference_min": min(values), "difference_max": max(values),
        "mcnemar_p": [r[key]["mcnemar_p"] for r in paired],
        "per_seed": [{"seed": r["seed"], **r[key]} for r in paired],
    }


def method_wall_time(rows: list[dict], name: str) -> float:
    """Mean over seeds of (scoring once + selection/scaling/slicing at every budget) for one method."""
    per_seed: dict[int, float] = {}
    for r in rows:
        if r["method"] == name:
            per_seed.setdefault(r["seed"], r["seconds"]["scoring"])
            per_seed[r["seed"]] += r["seconds"]["pruning"]
    return statistics.fmean(per_seed.values()) if per_seed else float("nan")


def markdown(data: dict, quick: bool) -> str:
    summary, rows, s = data["summary"], data["rows"], data["settings"]
    dense = data["unpruned"]["accuracy"]
    paper = data.get("paper_bert_base_sst2_at_0.6")
    budgets = sorted({r["budget"] for r in summary}, reverse=True)
    methods = list(dict.fromkeys(r["method"] for r in summary))
    seeds = sorted({r["seed"] for r in rows})
    seq = statistics.fmean(r["seq_len"] for r in rows) if rows else float("nan")
    env = data["environment"]
    lines = [
        f"# Quality: every method at every budget, task {s['task']}", "",
        f"{s['task_description']}; {s['test']} test texts; unlabeled sample {s['samples']} train texts "
        f"(seed-dependent order), {s['labeled']} of them labeled for the label-using methods, scaling on "
        f"{s['scale_samples']}; max length {s['max_len']} tokens. Seeds {seeds}. Budgets are relative "
        f"FLOPs (encoder MACs) at the unlabeled sample's average length, {seq:.1f} tokens.", "",
        "Accuracy in percent: mean over seeds, [95% bootstrap interval over test texts of the "
        "seed-averaged accuracy], and the spread between seeds (min to max).", "",
        "**vs KCM** is the paired comparison with KCM on the same test texts at the same budget and "
        "seed (same unlabeled sample): the mean over seeds of (method minus KCM) in points, with the "
        "95% paired bootstrap interval over test texts of the seed-averaged per-text difference; "
        "**McNemar p** is the exact two-sided test per seed (in seed order); **seed spread of the "
        "difference** is the lowest to highest per-seed difference. An interval that excludes 0 (with "
        "small p at every seed) is a demonstrated difference; one that includes 0 is not, whatever "
        "the separate intervals look like.", "",
        f"Unpruned: {pct(dense['value'])} [{pct(dense['ci95'][0])}, {pct(dense['ci95'][1])}].", "",
    ]
    if HEADLINE in budgets:
        kcm = next((r for r in summary if r["method"] == REFERENCE and r["budget"] == HEADLINE), None)
        unpruned_vs = kcm["unpruned_vs_kcm"] if kcm else None
        paper_head = " paper, BERT-base SST-2 |" if paper else ""
        lines += [f"## At {HEADLINE} of FLOPs", "",
                  "| method | accuracy | 95% CI | seeds min-max | vs KCM (points) [paired 95% CI] | "
                  "McNemar p | seed spread of the difference | agreement with unpruned | wall time to "
                  "prune (s) |" + paper_head,
                  "|---|---|---|---|---|---|---|---|---|" + ("---|" if paper else ""),
                  f"| unpruned | {pct(dense['value'])} | {pct(dense['ci95'][0])}-{pct(dense['ci95'][1])} | | "
                  f"{paired_cell(unpruned_vs)} | {p_cell(unpruned_vs)} | {spread_cell(unpruned_vs)} | 100 | |"
                  + (f" {paper['unpruned']} |" if paper else "")]
        for r in summary:
            if r["budget"] != HEADLINE:
                continue
            lines.append(
                f"| {r['label']} | {pct(r['accuracy_mean'])} | {pct(r['accuracy_ci95'][0])}-{pct(r['accuracy_ci95'][1])} | "
                f"{pct(r['accuracy_min'])}-{pct(r['accuracy_max'])} | {paired_cell(r['vs_kcm'])} | "
                f"{p_cell(r['vs_kcm'])} | {spread_cell(r['vs_kcm'])} | {pct(r['agreement_mean'])} | "
                f"{r['seconds_this_budget_mean']:.0f} |" + (f" {paper.get(r['method'], '')} |" if paper else ""))
        if paper:
            lines += ["", "Paper column: Nova et al. 2023, BERT-base on SST-2 at 60% FLOPs (context only: a "
                      "bigger model, another data set, sequence length 25.2)."]
        lines += [""]
    lines += ["## Accuracy by budget", "",
              "Mean over seeds [95% CI over test texts] (seed min-max).", "",
              "| method | " + " | ".join(str(b) for b in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    for m in methods:
        cells = []
        for b in budgets:
            r = next((x for x in summary if x["method"] == m and x["budget"] == b), None)
            cells.append(accuracy_cell(r))
        lines.append(f"| {cell_label(m)} | " + " | ".join(cells) + " |")
    lines += ["", "## Difference from KCM by budget (points, paired)", "",
              "Mean over seeds of (method minus KCM) [paired 95% CI], then McNemar p per seed.", "",
              "| method | " + " | ".join(str(b) for b in budgets) + " |",
              "|---|" + "---|" * len(budgets)]
    for m in methods:
        cells = []
        for b in budgets:
            r = next((x for x in summary if x["method"] == m and x["budget"] == b), None)
            key = "unpruned_vs_kcm" if m == REFERENCE else "vs_kcm"
            paired = None if r is None else r[key]
            cells.append("" if paired is None else f"{paired_cell(paired)}; p {p_cell(paired)}")
        label = "unpruned (vs KCM)" if m == REFERENCE else cell_label(m)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "## Wall time per method (s, mean over seeds)", "",
              "Scoring once per seed, then selection, scaling and slicing at every budget; evaluation "
              "excluded. A score component another method or seed of the same run had computed (R2 once "
              "per run; the D2 statistics and gradients once per seed) is reused and costs nothing in "
              "that method's time: the last column names them.", "",
              "| method | scoring | all budgets (total) | reused |", "|---|---|---|---|"]
    for m in methods:
        score = statistics.fmean(r["seconds"]["scoring"] for r in rows if r["method"] == m and
                                 r["budget"] == max(x["budget"] for x in rows if x["method"] == m))
        reused = sorted({c for r in rows if r["method"] == m for c in r.get("reused", [])})
        lines.append(f"| {cell_label(m)} | {score:.0f} | {method_wall_time(rows, m):.0f} | "
                     f"{', '.join(reused) or 'nothing'} |")
    before = env.get("load_average_before") or env.get("load_average_1_5_15_before")
    after = env.get("load_average_after") or env.get("load_average_1_5_15_after")
    state = env.get("machine_state") or env.get("shared_machine")
    lines += ["", "## Environment", "",
              f"{env.get('cpu', 'CPU not recorded')}, {env['threads']} threads, torch {env['torch']}, transformers "
              f"{env['transformers']}, Python {env['python']}. "
              + (f"Load average (1/5/15 min) before {before[0]:.1f}/{before[1]:.1f}/{before[2]:.1f}, after "
                 f"{after[0]:.1f}/{after[1]:.1f}/{after[2]:.1f}: {state}. " if before and after else "")
              + f"Wall time of this run {data['wall_seconds_this_run']:.0f} s.", "",
              f"Command: `{data['command']}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""A BERT-base-sized real model on this machine: MPNet-base fine-tuned on polarity, pruned by KCM,
weight magnitude, D2 and Mask-Tuning at relative FLOPs 0.6 and 0.5; KCM's stage times; the sliced speedup.

    python benchmarks/bench_mpnet.py [--methods kcm,weight-magnitude,d2,mask-tuning] [--budgets 0.6,0.5]
                                     [--samples 512] [--labeled 512] [--scale-samples 512] [--test N]
                                     [--threads 2] [--rounds 10] [--seeds 0,1,2] [--merge]

Needs ``python benchmarks/prepare_mpnet.py --finetune`` (all-mpnet-base-v2, 12 layers x 3072 FFN
neurons, hidden 768, fine-tuned once on the polarity demo and cached in ``<cache>/mpnet-polarity/``)
and the demo data (``python -m kcm_core demo prepare``); exits with code 2 otherwise.

What it measures, on the fine-tuned model:

* **Accuracy** on the demo's test split (the first ``--test`` sentences, default all 800) of the
  unpruned model and of every method at every budget, with the unlabeled sample the quality benchmark
  uses (``--samples`` train sentences, ``TextData.sample`` of each seed in draw order; scaling on the
  first ``--scale-samples``, Mask-Tuning's labels on the first ``--labeled``; the seed is also the
  method's own). Rows, the per-text hits and the paired comparisons are ``bench_quality``'s own
  functions (``measured_row``, ``summarise``): each method minus KCM (same seed) and each pruned model
  minus the unpruned one on the same test sentences, with a seeded paired bootstrap interval and
  McNemar's exact p (``kcm_core.evaluate.paired_difference``), averaged over seeds with the spread
  between seeds shown apart. R2 reads the weights alone and is computed once per run; the D2
  statistics once per seed. The paper's BERT-base / SST-2 numbers at 0.6 stand beside it for context
  only (another model and data set).
* **Stage times of the whole KCM run** at the speed budget (0.6): R2 on the real 3072-wide weights of
  all 12 layers, D2, selection, scaling and slicing, beside the talk's "pruning time <= 7 minutes" per
  task, which is a GPU figure (not the same hardware).
* **Speedup of that sliced KCM model**: dense vs sliced forward passes at batch 32, full-length
  sequences of 64 tokens (no padding), in paired rounds (both models each round, order alternating,
  so load drift on a shared machine hits both); the median per-round ratio with a 95% bootstrap
  interval over rounds (``common.ratio_interval``). The paper measured 1.44x to 1.59x for BERT-base at
  0.6 on a V100.

Results are saved after every method (a stopped run keeps what it measured, and the file lists what
is missing). ``--merge`` keeps an earlier file's rows for other (method, budget, seed) cells, and its
stage times and speedup when this run does not measure them, but only when that file was measured on
the same fine-tuned model (its unpruned per-sentence hits and fine-tuning loss are identical) with the
same settings; otherwise it says so and keeps nothing. Writes benchmarks/results/mpnet.json and mpnet.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # see bench_speed: shared cores
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_quality import (PAPER_SST2_AT_06, REFERENCE, p_cell, paired_cell, pct,  # noqa: E402
                           pruned_rows, spread_cell, summarise)
from common import machine_line, ratio_interval, ratio_text, run_environment  # noqa: E402
from kcm_core.arch import model_shape  # noqa: E402
from kcm_core.evaluate import evaluate_classifier  # noqa: E402
from kcm_core.methods import method  # noqa: E402
from prepare_mpnet import polarity_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
MPNET_METHODS = ("kcm", "weight-magnitude", "d2", "mask-tuning")
BUDGETS = (0.6, 0.5)
SPEED_BUDGET = 0.6
MAX_LEN = 64
TALK_PRUNING_SECONDS = 7 * 60          # "pruning time <= 7 minutes" per task, on one GPU
PAPER_SPEEDUP_AT_06 = (1.44, 1.59)      # BERT-base on a V100


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quiet_progress(msg: str, frac: float) -> None:
    if frac == 0.0 and ":" not in msg:
        log(f"      {msg}")


def parse_list(text: str, kind) -> list:
    return [kind(x) for x in text.split(",") if x.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(MPNET_METHODS))
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--samples", type=int, default=512, help="unlabeled train sentences (default 512)")
    parser.add_argument("--labeled", type=int, default=512, help="labeled sentences for Mask-Tuning (default 512)")
    parser.add_argument("--scale-samples", type=int, default=512, help="sentences for scaling (default 512)")
    parser.add_argument("--test", type=int, default=None, help="first N test sentences (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10, help="paired timing rounds (default 10)")
    parser.add_argument("--seeds", default="0", help="comma list of seeds (default 0)")
    parser.add_argument("--merge", action="store_true",
                        help="keep an earlier file's rows for other (method, budget, seed) cells")
    args = parser.parse_args()
    methods, budgets = parse_list(args.methods, str), parse_list(args.budgets, float)
    seeds = parse_list(args.seeds, int)
    for name in methods:
        method(name)                                   # unknown names fail before any work

    from kcm_core.demos import classifier as demo
    from kcm_core.data import make_batches
    from kcm_core.models import load_model
    folder = polarity_dir()
    if not (folder / "finetune.json").is_file() or not demo.demo_ready():
        log("bench_mpnet needs `python benchmarks/prepare_mpnet.py --finetune` (after "
            "`python -m kcm_core demo prepare`)")
        return 2
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    started = time.perf_counter()

    model, tokenizer = load_model(str(folder), device="cpu")
    finetuned = json.loads((folder / "finetune.json").read_text())
    shape = model_shape(model.config)
    test = demo.load_demo_split("test")
    test = test.subset(range(min(args.test or len(test), len(test))))
    test_batches = make_batches(test, tokenizer, max_len=MAX_LEN, batch_size=64)
    log(f"unpruned fine-tuned MPNet-base on {len(test)} test sentences")
    t = time.perf_counter()
    dense = evaluate_classifier(model, test_batches, seed=0)
    dense_eval_s = time.perf_counter() - t
    dense_hits = (dense.predictions == torch.tensor(test.labels)).int()
    log(f"    accuracy {dense.accuracy.value:.4f} ({dense_eval_s:.0f} s)")

    train = demo.load_demo_split("train")
    samples = min(args.samples, len(train))
    data = {
        "model": {"folder": str(folder), "family": shape.family, "model_type": shape.model_type,
                  "layers": shape.layers, "ffn_width": shape.ffn_width[0], "hidden": shape.hidden,
                  "parameters": sum(p.numel() for p in model.parameters()),
                  "finetune": {k: finetuned.get(k) for k in ("train_examples", "eval_examples", "test_accuracy",
                                                              "config", "wall_seconds", "final_loss")}},
        "settings": {"samples": samples, "labeled": min(args.labeled, samples),
                     "scale_samples": min(args.scale_samples, samples),
                     "test": len(test), "test_available": len(demo.load_demo_split("test")), "max_len": MAX_LEN,
                     "threads": args.threads, "speed_budget": SPEED_BUDGET},
        "unpruned": {"accuracy": dense.accuracy.to_dict(), "hits": "".join(map(str, dense_hits.tolist())),
                     "evaluation_seconds": dense_eval_s},
        "paper_bert_base_sst2_at_0.6": PAPER_SST2_AT_06,
        "rows": [], "kcm_run": None, "speed": None,
    }
    earlier = earlier_file(data) if args.merge else None
    kept = earlier["rows"] if earlier else []
    data["requested"] = {"methods": methods, "budgets": budgets, "seeds": seeds}
    rows: list[dict] = []
    for row, result in pruned_rows(model, tokenizer, train, test_batches, test.labels, dense.predictions,
                                   methods=methods, budgets=budgets, seeds=seeds, samples=samples,
                                   labeled=data["settings"]["labeled"],
                                   scale_samples=data["settings"]["scale_samples"], max_len=MAX_LEN, batch_size=32):
        rows.append(row)
        # the stage times of a whole run: the first KCM at the speed budget computing every component itself
        if (row["method"] == REFERENCE and row["budget"] == SPEED_BUDGET and not row["reused"]
                and data["kcm_run"] is None):
            data["kcm_run"] = kcm_run(result, row["seconds"]["scoring"], row["seconds"]["pruning"], shape,
                                      row["seed"])
            log(f"    KCM stages {data['kcm_run']['stage_seconds']}; timing dense vs sliced, batch 32 x "
                f"{MAX_LEN} tokens, {args.rounds} paired rounds")
            data["speed"] = speed(model, result.model, args.rounds, data["kcm_run"]["relative_flops"])
            log(f"    speedup {ratio_text(data['speed']['speedup'])}")
        del result
        done = {cell(r) for r in rows}
        still = [r for r in kept if cell(r) not in done]
        data["rows"] = still + rows
        data["kept_from_earlier"] = ({"cells": len(still), "seeds": sorted({r["seed"] for r in still}),
                                      "command": earlier["command"], "environment": earlier["environment"]}
                                     if still else None)
        save(data, load_before, started, earlier)
    save(data, load_before, started, earlier)
    log(f"wrote {RESULTS / 'mpnet.json'} and mpnet.md in {data['wall_seconds']:.0f} s")
    return 0


def cell(row: dict) -> tuple:
    return row["method"], row["budget"], row["seed"]


def earlier_file(data: dict) -> dict | None:
    """--merge: the earlier results file, when it was measured on the same fine-tuned model (identical
    unpruned per-sentence hits and fine-tuning loss) with the same settings; else None, with a note."""
    path = RESULTS / "mpnet.json"
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    same_settings = all(old["settings"].get(k) == v for k, v in data["settings"].items() if k != "threads")
    # the loss to float tolerance: a fine-tune rerun under another transformers release differs in the
    # 7th digit (0.5074023 vs 0.5074015 from 5.24 to 5.25) with identical predictions
    old_loss, new_loss = (d["model"]["finetune"].get("final_loss") for d in (old, data))
    same_loss = old_loss == new_loss or (None not in (old_loss, new_loss) and abs(old_loss - new_loss) <= 1e-5 * abs(old_loss))
    same_model = old["unpruned"]["hits"] == data["unpruned"]["hits"] and same_loss
    if same_settings and same_model and old_loss != new_loss:
        log(f"--merge: the fine-tuning loss is {new_loss} here and {old_loss} in the earlier file (within 1e-5, "
            "identical unpruned predictions): its rows are kept")
    if not (same_settings and same_model):
        log("--merge: the earlier file was measured " + ("with other settings" if not same_settings else
            "on another fine-tuned model (its unpruned hits or fine-tuning loss differ)") + "; nothing kept")
        return None
    for row in old["rows"]:
        row.setdefault("reused", [])
    return old


def kcm_run(result, score_s: float, prune_s: float, shape, seed: int) -> dict:
    """The whole KCM run's stage times (scoring: R2 and D2; then selection, scaling, slicing)."""
    stages = {k: result.seconds[k] for k in ("r2", "d2", "selection", "scaling", "slicing") if k in result.seconds}
    return {"seed": seed, "stage_seconds": stages, "total_seconds": score_s + prune_s, "seq_len": result.seq_len,
            "relative_flops": row_flops(shape, result), "kept_per_layer": result.plan.kept_counts,
            "r2_iterations": result.details.to_dict().get("r2_iterations"),
            "talk_pruning_seconds_gpu": TALK_PRUNING_SECONDS}


def row_flops(shape, result) -> float:
    from kcm_core.flops import relative_flops
    return relative_flops(shape, result.seq_len, result.plan.kept_counts)


def speed(dense, sliced, rounds: int, achieved: float) -> dict:
    ids = torch.randint(1000, 20000, (32, MAX_LEN), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    dense_s, sliced_s = timed_rounds(dense, sliced, batch, rounds)
    return {"batch": 32, "seq_len": MAX_LEN, "rounds": rounds, "dense_seconds": dense_s,
            "sliced_seconds": sliced_s, "speedup": ratio_interval(dense_s, sliced_s, seed=0),
            "ideal_speedup": 1 / achieved, "paper_speedup_v100": list(PAPER_SPEEDUP_AT_06)}


def missing(data: dict) -> list[str]:
    """The (method, budget, seed) cells and parts this run asked for that the file does not hold."""
    done = {cell(r) for r in data["rows"]}
    asked = data["requested"]
    out = [f"{m} at {b} (seed {s})" for s in asked["seeds"] for m in asked["methods"] for b in asked["budgets"]
           if (m, b, s) not in done]
    if data["kcm_run"] is None:
        out.append("KCM stage times")
    if data["speed"] is None:
        out.append("sliced speedup")
    return out


def save(data: dict, load_before, started: float, earlier: dict | None = None) -> None:
    """Write the JSON and Markdown; with ``earlier`` (--merge), its stage times and speedup stand in for
    parts this run did not measure (their own environment and command are kept beside them)."""
    for part in ("kcm_run", "speed"):
        if earlier and data[part] is None and earlier.get(part):
            data[part] = {**earlier[part], "from_earlier_run": {"command": earlier["command"],
                                                                "environment": earlier["environment"]}}
    data["summary"] = summarise(data["rows"], torch.tensor([int(c) for c in data["unpruned"]["hits"]]))
    data["not_measured"] = missing(data)
    data["environment"] = run_environment(load_before)
    data["command"] = data["environment"]["command"]
    data["wall_seconds"] = time.perf_counter() - started
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "mpnet.json").write_text(json.dumps(data, indent=1) + "\n")
    (RESULTS / "mpnet.md").write_text(markdown(data))


def timed_rounds(dense, sliced, batch, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds per forward pass of each model, one pass of each per round (order alternating), after
    one warm-up pass each."""
    def once(model) -> float:
        t = time.perf_counter()
        with torch.no_grad():
            model(**batch)
        return time.perf_counter() - t

    once(dense), once(sliced)
    dense_s, sliced_s = [], []
    for r in range(rounds):
        if r % 2:
            sliced_s.append(once(sliced)), dense_s.append(once(dense))
        else:
            dense_s.append(once(dense)), sliced_s.append(once(sliced))
    return dense_s, sliced_s


def accuracy_table(data: dict, budget: float) -> list[str]:
    """Markdown rows for one budget: accuracy, paired differences from the unpruned model and from KCM,
    agreement, and the paper's BERT-base SST-2 number at 0.6 (context only)."""
    dense, paper = data["unpruned"]["accuracy"], data["paper_bert_base_sst2_at_0.6"]
    with_paper = budget == 0.6
    lines = ["| method | accuracy [95% CI] | seeds min-max | minus unpruned (points) [paired 95% CI] | McNemar p "
             "| minus KCM (points) [paired 95% CI] | McNemar p | seed spread of minus KCM | agreement with "
             "unpruned |" + (" paper: BERT-base SST-2 at 0.6 |" if with_paper else ""),
             "|---|---|---|---|---|---|---|---|---|" + ("---|" if with_paper else ""),
             f"| unpruned | {pct(dense['value'])} [{pct(dense['ci95'][0])}, {pct(dense['ci95'][1])}] | | | | | | | 100 |"
             + (f" {paper['unpruned']} |" if with_paper else "")]
    for r in data["summary"]:
        if r["budget"] != budget:
            continue
        vs_kcm = ("(reference) | | " if r["method"] == REFERENCE else
                  f"{paired_cell(r['vs_kcm'])} | {p_cell(r['vs_kcm'])} | {spread_cell(r['vs_kcm'])}")
        lines.append(f"| {r['label']} | {pct(r['accuracy_mean'])} [{pct(r['accuracy_ci95'][0])}, "
                     f"{pct(r['accuracy_ci95'][1])}] | {pct(r['accuracy_min'])}-{pct(r['accuracy_max'])} | "
                     f"{paired_cell(r['vs_unpruned'])} | {p_cell(r['vs_unpruned'])} | "
                     f"{vs_kcm} | {pct(r['agreement_mean'])} |" + (f" {paper.get(r['method'], '')} |" if with_paper else ""))
    return lines


def markdown(data: dict) -> str:
    m, s, ft = data["model"], data["settings"], data["model"]["finetune"]
    seeds = sorted({r["seed"] for r in data["rows"]})
    budgets = sorted({r["budget"] for r in data["rows"]}, reverse=True)
    lines = [
        "# MPNet-base on polarity: accuracy by method, KCM stage times and sliced speedup", "",
        f"all-mpnet-base-v2 ({m['layers']} layers x {m['ffn_width']} FFN neurons, hidden {m['hidden']}, "
        f"{m['parameters']:,} parameters with its classification head), fine-tuned once on "
        f"{ft['train_examples']} polarity train sentences ({ft['config']['epochs']} epoch, max length "
        f"{ft['config']['max_len']}; test accuracy then "
        f"{pct(ft['test_accuracy'])} on {ft['eval_examples']}; see `mpnet_prepare.json` for why and how "
        "the sentences were chosen).", "",
        f"Pruned with seeds {', '.join(map(str, seeds))} (each seed draws its own {s['samples']} unlabeled "
        f"train sentences; scaling on the first {s['scale_samples']}, Mask-Tuning's labels on the first "
        f"{s['labeled']}), evaluated on {s['test']} of the {s['test_available']} demo test sentences. "
        "Accuracy in percent: mean over seeds [95% bootstrap interval over test sentences of the "
        "seed-averaged accuracy], and the lowest to highest seed. Differences are paired on the same test "
        "sentences (and, against KCM, the same seed): the mean over seeds in points [95% paired bootstrap "
        "interval over test sentences of the seed-averaged per-sentence difference], McNemar's exact p per "
        "seed (in seed order), and the spread of the per-seed differences kept apart.", ""]
    for budget in budgets:
        if any(r["budget"] == budget for r in data["summary"]):
            lines += [f"## At {budget} of FLOPs", "", *accuracy_table(data, budget), ""]
    lines += ["The paper column is Nova et al. 2023, BERT-base on SST-2 (GLUE dev) at 60% of FLOPs: another "
              "model and another data set, for context only; the paper gives no 0.5 numbers.", ""]
    run = data["kcm_run"]
    if run:
        lines += [f"## KCM's stage times at {s['speed_budget']}", "",
                  f"Seed {run.get('seed', 0)}, KCM computing R2 and D2 itself"
                  + (f"; measured in an earlier run (`{run['from_earlier_run']['command']}`; "
                     f"{machine_line(run['from_earlier_run']['environment'])})" if "from_earlier_run" in run else
                     "") + ".", "",
                  f"Achieved relative FLOPs {run['relative_flops']:.3f} at {run['seq_len']:.1f} tokens; R2 "
                  f"iterations per layer {min(run['r2_iterations'])}-{max(run['r2_iterations'])}."
                  if run.get("r2_iterations") else "", "",
                  "| stage | seconds |", "|---|---|",
                  *[f"| {k} | {v:.1f} |" for k, v in run["stage_seconds"].items()],
                  f"| **whole run** | **{run['total_seconds']:.0f}** |", "",
                  f"The talk's pruning time is at most {run['talk_pruning_seconds_gpu']} s per task **on one GPU**; "
                  f"this is {s['threads']} CPU threads on the machine below, so the comparison is of orders of "
                  "magnitude only.", ""]
    sp = data["speed"]
    if sp:
        lines += ["## Speed of the sliced KCM model", "",
                  *([f"Measured in the earlier run named above (`{sp['from_earlier_run']['command']}`).", ""]
                    if "from_earlier_run" in sp else []),
                  f"Sliced vs dense, batch {sp['batch']} x {sp['seq_len']} tokens, {sp['rounds']} paired rounds: "
                  f"speedup {ratio_text(sp['speedup'])} (median per-round ratio [95% bootstrap interval over "
                  f"rounds]; ideal from the FLOPs count {sp['ideal_speedup']:.2f}x; the paper: "
                  f"{sp['paper_speedup_v100'][0]}x to {sp['paper_speedup_v100'][1]}x for BERT-base on a V100).", ""]
    kept = data.get("kept_from_earlier")
    lines += [f"Not measured in this file: {', '.join(data['not_measured'])}." if data["not_measured"]
              else "Every cell this run asked for is in this file.", "",
              *([f"Kept from an earlier run on the same fine-tuned model (identical unpruned hits and "
                 f"fine-tuning loss): {kept['cells']} rows of seeds {', '.join(map(str, kept['seeds']))} "
                 f"(`{kept['command']}`; {machine_line(kept['environment'])}).", ""] if kept else []),
              machine_line(data["environment"]), "", f"Command: `{data['command']}`; wall time "
              f"{data['wall_seconds'] / 60:.0f} min.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

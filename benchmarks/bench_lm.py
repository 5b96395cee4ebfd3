"""Perplexity of every label-free method on the LM demo (SmolLM2-135M on movie reviews), paired
against KCM on the same held-out blocks, and the wall time of each stage of a whole KCM run.

For each method (kcm, r2, d2, wanda-sp, flap, weight-magnitude, output-magnitude, random) and relative
FLOPs budget (0.95, 0.9, 0.85, 0.8, counted at the block length): prune the LM demo with the CLI's
defaults for language models (32 calibration blocks of 256 tokens, scaling on the first 8 of them),
then measure perplexity on held-out blocks of documents calibration never saw. Random is drawn with
three seeds; every other method is deterministic (its calibration blocks are fixed). Each method is
compared with KCM at the same budget **paired over the same blocks**: the ratio of their perplexities
with a 95% interval from one bootstrap over blocks applied to both and the bootstrap p of "ratio = 1"
(``kcm_core.lm.paired_perplexity``). Random's seeds are shown as their spread, separately.

    python benchmarks/bench_lm.py [--methods kcm,flap] [--budgets 0.9] [--eval-blocks 16]
    python benchmarks/bench_lm.py --render-only      # lm.md again from lm.json

Needs the LM demo (``python -m kcm_core demo prepare lm``). Writes benchmarks/results/lm.json and
lm.md. Progress on stderr. The machine's load before and after is recorded: a run under load says so.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kcm_core.demos import lm as demo_lm  # noqa: E402
from kcm_core.arch import model_shape  # noqa: E402
from kcm_core.flops import relative_flops  # noqa: E402
from kcm_core.lm import BlockStats, evaluate_lm, paired_perplexity, split_blocks  # noqa: E402
from kcm_core.methods import METHODS, method  # noqa: E402
from kcm_core.models import load_model  # noqa: E402
from kcm_core.pipeline import PruneConfig, compute_scores, prune, resolve_seq_len  # noqa: E402
from common import machine_line, perplexity_cell, run_environment  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
METHOD_NAMES = ("kcm", "r2", "d2", "wanda-sp", "flap", "weight-magnitude", "output-magnitude", "random")
BUDGETS = (0.95, 0.9, 0.85, 0.8)
RANDOM_SEEDS = (0, 1, 2)
CALIBRATION_BLOCKS, SCALE_BLOCKS, BLOCK = 32, 8, 256


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_demo(eval_blocks: int, calibration_blocks: int = CALIBRATION_BLOCKS):
    """The LM demo's model and tokenizer, its calibration blocks and ``eval_blocks`` held-out blocks
    (batches of 4 blocks of ``BLOCK`` tokens); None, said on stderr, when the demo is not prepared."""
    summary = demo_lm.stored_summary()
    if summary is None:
        log("the LM demo is not prepared: python -m kcm_core demo prepare lm")
        return None
    model, tokenizer = load_model(summary["model_dir"], device="cpu")
    calibration, evaluation = split_blocks(demo_lm.load_lm_split("calibration"), demo_lm.load_lm_split("evaluation"),
                                           tokenizer, BLOCK, calibration_blocks=calibration_blocks,
                                           evaluation_blocks=eval_blocks, batch_size=4)
    return model, tokenizer, calibration, evaluation


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHOD_NAMES))
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--eval-blocks", type=int, default=16)
    parser.add_argument("--merge", action="store_true",
                        help="keep the rows of lm.json for (method, budget) cells not run now (same settings "
                             "required), so a grid can be completed in parts; both commands are recorded")
    parser.add_argument("--render-only", action="store_true", help="rewrite lm.md from lm.json, measuring nothing")
    args = parser.parse_args()
    if args.render_only:
        data = json.loads((RESULTS / "lm.json").read_text())
        if pair_stored_blocks(data["rows"]):
            (RESULTS / "lm.json").write_text(json.dumps(data, indent=2) + "\n")
        (RESULTS / "lm.md").write_text(markdown(data))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for name in methods:
        method(name)
    budgets = [float(b) for b in args.budgets.split(",")]
    load_before = os.getloadavg()
    started = time.perf_counter()
    loaded = load_demo(args.eval_blocks)
    if loaded is None:
        return 2
    model, tokenizer, calibration, evaluation = loaded
    shape = model_shape(model.config)
    seq_len = resolve_seq_len(shape, calibration, None)
    log("unpruned perplexity")
    t = time.perf_counter()
    dense = evaluate_lm(model, evaluation)
    dense_s = time.perf_counter() - t
    rows, stats = [], {}
    shared: dict = {}                    # R2 and the calibration statistics, computed once for all methods
    for name in methods:
        seeds = RANDOM_SEEDS if METHODS[name].seeded else (0,)
        for seed in seeds:
            base = PruneConfig(method=name, budget=budgets[0], seed=seed, scale_samples=SCALE_BLOCKS)
            t = time.perf_counter()
            reused = sorted(set(shared) & METHODS[name].needs)
            scores = compute_scores(model, base, calibration, shared=shared)
            score_s = time.perf_counter() - t
            log(f"{name} seed {seed}: scored in {score_s:.0f} s ({scores.seconds}; reused {reused or 'nothing'})")
            for budget in budgets:
                t = time.perf_counter()
                result = prune(model, replace(base, budget=budget), calibration, method_scores=scores)
                prune_s = time.perf_counter() - t
                t = time.perf_counter()
                ev = evaluate_lm(result.model, evaluation)
                eval_s = time.perf_counter() - t
                stats[name, budget, seed] = ev.stats
                rows.append({"method": name, "budget": budget, "seed": seed,
                             "relative_flops": relative_flops(shape, seq_len, result.plan.kept_counts),
                             "kept": result.plan.total_kept, "perplexity": ev.perplexity.to_dict(),
                             "block_nll": ev.stats.nll.tolist(), "block_tokens": ev.stats.tokens.tolist(),
                             "vs_unpruned": paired_perplexity(ev.stats, dense.stats).to_dict(),
                             "reused": reused,
                             "seconds": {"scoring": score_s, "prune": prune_s, "evaluation": eval_s,
                                         **{f"stage_{k}": v for k, v in result.seconds.items()}}})
                log(f"  {name} @ {budget} (seed {seed}): perplexity {ev.perplexity.value:.2f} "
                    f"[{prune_s:.0f} s pruning, {eval_s:.0f} s evaluation]")
    own_rows = list(rows)
    commands = [" ".join(["python"] + sys.argv)]
    if args.merge:
        kept, earlier_commands = earlier_rows(methods, budgets, args.eval_blocks)
        rows, commands = kept + rows, earlier_commands + commands
        for row in kept:                 # earlier rows paired against the KCM run of their own time,
            if "block_nll" in row:       # or against this run's KCM when their blocks were stored
                stats[row["method"], row["budget"], row["seed"]] = _stats_of(row)
    for row in rows:
        ref = stats.get(("kcm", row["budget"], 0))
        own = stats.get((row["method"], row["budget"], row["seed"]))
        if ref is not None and own is not None and row["method"] != "kcm":
            row["vs_kcm"] = paired_perplexity(own, ref).to_dict()
    environment = run_environment(load_before)
    own_kcm = [r for r in own_rows if r["method"] == "kcm"]
    if own_kcm:         # the stage times of this run's KCM (its first budget), with this run's load
        kcm_run = {"budget": own_kcm[0]["budget"], "seconds": own_kcm[0]["seconds"],
                   "machine_state": environment["machine_state"], "command": commands[-1]}
    else:               # merged without KCM: the stored one stays
        kcm_run = json.loads((RESULTS / "lm.json").read_text()).get("kcm_run") if args.merge else None
    data = {"settings": {"model": demo_lm.MODEL_SOURCE, "text": demo_lm.TEXT_SOURCE, "block": BLOCK,
                         "calibration_blocks": CALIBRATION_BLOCKS, "scale_blocks": SCALE_BLOCKS,
                         "eval_blocks": args.eval_blocks, "seq_len": seq_len,
                         "command": " && ".join(commands)},
            "unpruned": {"perplexity": dense.perplexity.to_dict(), "evaluation_seconds": dense_s},
            "rows": rows,
            "kcm_run": kcm_run,
            "environment": environment,
            "wall_seconds": time.perf_counter() - started}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lm.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "lm.md").write_text(markdown(data))
    print(markdown(data))
    return 0


def _stats_of(row: dict) -> BlockStats:
    return BlockStats(np.asarray(row["block_nll"]), np.asarray(row["block_tokens"]), None, None)


def pair_stored_blocks(rows: list[dict]) -> bool:
    """Recompute each row's pairing with KCM (ratio, interval, p) from the per-block NLL the rows
    keep, where both have it; whether anything changed."""
    kcm = {r["budget"]: _stats_of(r) for r in rows if r["method"] == "kcm" and "block_nll" in r}
    changed = False
    for row in rows:
        if row["method"] != "kcm" and "block_nll" in row and row["budget"] in kcm:
            paired = paired_perplexity(_stats_of(row), kcm[row["budget"]]).to_dict()
            changed |= paired != row.get("vs_kcm")
            row["vs_kcm"] = paired
    return changed


def earlier_rows(methods: list[str], budgets: list[float], eval_blocks: int) -> tuple[list[dict], list[str]]:
    """Rows of the stored lm.json for the (method, budget) cells this run does not measure; its settings
    must match this run's."""
    path = RESULTS / "lm.json"
    if not path.is_file():
        return [], []
    old = json.loads(path.read_text())
    s = old["settings"]
    ours = {"block": BLOCK, "calibration_blocks": CALIBRATION_BLOCKS, "scale_blocks": SCALE_BLOCKS,
            "eval_blocks": eval_blocks}
    theirs = {k: s.get(k) for k in ours}
    if theirs != ours:
        raise SystemExit(f"--merge: lm.json was measured with {theirs}, this run uses {ours}; "
                         "run without --merge or with the same settings")
    return ([r for r in old["rows"] if r["method"] not in methods or r["budget"] not in budgets],
            s["command"].split(" && "))


def markdown(data: dict) -> str:
    s, env = data["settings"], data["environment"]
    budgets = sorted({r["budget"] for r in data["rows"]}, reverse=True)
    names = [m for m in METHOD_NAMES if any(r["method"] == m for r in data["rows"])]
    dense = data["unpruned"]["perplexity"]
    lines = ["# Perplexity on the LM demo, every label-free method, paired against KCM", "",
             f"Model: {s['model']}. Text: {s['text']}. Calibration: {s['calibration_blocks']} blocks of "
             f"{s['block']} tokens (scaling on the first {s['scale_blocks']}); evaluation: "
             f"{s['eval_blocks']} held-out blocks. Relative FLOPs counted at {s['seq_len']:.0f} tokens.",
             f"Unpruned perplexity {dense['value']:.2f} [{dense['ci95'][0]:.2f}, {dense['ci95'][1]:.2f}].",
             "", "Each cell: perplexity, then (ratio to KCM's perplexity at the same budget on the same "
             "blocks [paired 95% interval], and the bootstrap p of no difference where this file has "
             "it); a ratio interval above 1 means KCM is better. Random: mean of its seeds' perplexities "
             "with the seed spread beside it, ratio for seed 0.", "",
             "| method | " + " | ".join(f"{b}" for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for name in names:
        cells = []
        for b in budgets:
            rows = [r for r in data["rows"] if r["method"] == name and r["budget"] == b]
            if not rows:
                cells.append("")
                continue
            first = dict(rows[0])
            if len(rows) > 1:
                values = [r["perplexity"]["value"] for r in rows]
                first = {**first, "perplexity": {**first["perplexity"], "value": float(np.mean(values))}}
            cells.append(perplexity_cell(first) + (f" (seeds {min(values):.1f}-{max(values):.1f})" if len(rows) > 1 else ""))
        lines.append(f"| {METHODS[name].label} | " + " | ".join(cells) + " |")
    kcm = [r for r in data["rows"] if r["method"] == "kcm"]
    run = data.get("kcm_run") or ({"budget": kcm[0]["budget"], "seconds": kcm[0]["seconds"]} if kcm else None)
    if run:
        stages = run["seconds"]
        total = stages["scoring"] + stages["prune"]
        where = f"; {run['machine_state']}" if run.get("machine_state") else ""
        lines += ["", f"KCM wall time at {run['budget']}: {total:.0f} s = scoring "
                  f"{stages['scoring']:.0f} s (R2 {stages.get('stage_r2', 0):.0f} s, D2 "
                  f"{stages.get('stage_d2', 0):.0f} s) + selection, scaling and slicing {stages['prune']:.0f} s "
                  f"(scaling {stages.get('stage_scaling', 0):.0f} s){where}."]
    lines += ["", machine_line(env),
              f"Command: `{s['command']}`; wall time {data['wall_seconds']:.0f} s"
              + (" (the last command)." if " && " in s["command"] else "."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Which neurons x how the rest is repaired, on the LM demo: held-out perplexity of each cell, paired.

A cell is ``score/allocation/repair/target``: the method whose score selects the neurons (``kcm``,
``d2``, ``flap``, ``wanda-sp``, ...), how the budget is spread over layers (``pooled``: the raw scores
ranked over all layers, the paper; ``standardised``: per-layer z-scores ranked together), the repair
step (``none``, ``bias``, ``scales``, ``scales+bias``, ``refit``) and its target (``teacher``: the unpruned
model's output; ``local``: the unpruned layer on the pruned model's inputs). The anchors are cells too:
FLAP = ``flap/pooled/bias/teacher`` (its score is already standardised), the paper's KCM =
``kcm/pooled/scales/teacher``, Wanda-sp = ``wanda-sp/pooled/none/teacher``.

Every cell is evaluated on the same held-out blocks (documents calibration never saw) and compared,
paired over those blocks, with the reference cell (``--reference``, default: the library's default
recipe for language models) at the same budget: the ratio of perplexities with a 95% bootstrap interval over blocks and the
bootstrap p of "ratio = 1" (``kcm_core.lm.paired_perplexity``); also against the unpruned model. Each
pruned layer's relative output error after the repair (``||y_pruned - y_unpruned|| / ||y_unpruned||``
on the pruned model's own inputs, evaluation blocks) is recorded per layer with ``--layer-errors``.

    python benchmarks/bench_lm_grid.py --cells kcm/pooled/scales/teacher,flap/pooled/bias/teacher \\
        --budgets 0.9,0.8 --eval-blocks 32 [--merge] [--stem lm_grid]
    python benchmarks/bench_lm_grid.py --render-only

Needs the LM demo (``python -m kcm_core demo prepare lm``). Writes benchmarks/results/<stem>.json and
.md; ``--merge`` keeps the stored cells this run does not measure (same settings required).
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
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kcm_core.demos import lm as demo_lm  # noqa: E402
from kcm_core.arch import model_shape  # noqa: E402
from kcm_core.flops import relative_flops  # noqa: E402
from kcm_core.lm import BlockStats, evaluate_lm, paired_perplexity  # noqa: E402
from kcm_core.methods import DEFAULT_LM_METHOD, METHODS  # noqa: E402
from kcm_core.pipeline import compute_scores, prune, resolve_seq_len  # noqa: E402
from bench_lm import load_demo  # noqa: E402
from common import cell_config, machine_line, run_environment, write_results  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
CALIBRATION_BLOCKS, SCALE_BLOCKS, BLOCK = 32, 8, 256


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", required=False, default="")
    parser.add_argument("--budgets", default="0.95,0.9,0.85,0.8")
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--reference", default=DEFAULT_LM_METHOD)
    parser.add_argument("--stem", default="lm_grid")
    parser.add_argument("--merge", action="store_true")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    path = RESULTS / f"{args.stem}.json"
    if args.render_only:
        data = json.loads(path.read_text())
        pair_rows(data)
        write_results(args.stem, data, markdown(data))
        return 0
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    budgets = [float(b) for b in args.budgets.split(",")]
    for c in cells:
        cell_config(c, budget=budgets[0], scale_samples=SCALE_BLOCKS)           # refuse a bad cell before any work
    load_before = os.getloadavg()
    started = time.perf_counter()
    torch.manual_seed(0)
    loaded = load_demo(args.eval_blocks, CALIBRATION_BLOCKS)
    if loaded is None:
        return 2
    model, _, calibration, evaluation = loaded
    seq_len = resolve_seq_len(model_shape(model.config), calibration, None)
    log("unpruned perplexity")
    dense = evaluate_lm(model, evaluation)
    shared: dict = {}
    rows = []
    for cell in cells:
        base = cell_config(cell, budget=budgets[0], scale_samples=SCALE_BLOCKS)
        reused = sorted(set(shared) & METHODS[base.method].needs)     # components another cell computed
        t = time.perf_counter()
        scores = compute_scores(model, base, calibration, shared=shared)
        score_s = time.perf_counter() - t
        for budget in budgets:
            config = replace(base, budget=budget)
            t = time.perf_counter()
            result = prune(model, config, calibration, method_scores=scores)
            prune_s = time.perf_counter() - t
            t = time.perf_counter()
            ev = evaluate_lm(result.model, evaluation)
            eval_s = time.perf_counter() - t
            rows.append({"cell": cell, "budget": budget, "reused": reused,
                         "repair": config.resolved_repair.kind, "target": config.resolved_repair.target,
                         "allocation": config.resolved_allocation,
                         "relative_flops": relative_flops(model_shape(model.config), seq_len, result.plan.kept_counts),
                         "kept": result.plan.kept_counts,
                         "repair_failed_layers": result.plan.info.repair_failed_layers,
                         "layer_errors": result.plan.info.repair_errors,
                         "perplexity": ev.perplexity.to_dict(),
                         "block_nll": ev.stats.nll.tolist(), "block_tokens": ev.stats.tokens.tolist(),
                         "vs_unpruned": paired_perplexity(ev.stats, dense.stats).to_dict(),
                         "seconds": {"scoring": score_s, "prune": prune_s, "evaluation": eval_s,
                                     **{f"stage_{k}": v for k, v in result.seconds.items()}}})
            log(f"{cell} @ {budget}: perplexity {ev.perplexity.value:.2f} "
                f"[{prune_s:.0f} s pruning, {eval_s:.0f} s evaluation; min kept {min(result.plan.kept_counts)}]")
            del result
    commands = [" ".join(["python"] + sys.argv)]
    if args.merge and path.is_file():
        old = json.loads(path.read_text())
        ours = {"block": BLOCK, "calibration_blocks": CALIBRATION_BLOCKS, "scale_blocks": SCALE_BLOCKS,
                "eval_blocks": args.eval_blocks}
        theirs = {k: old["settings"].get(k) for k in ours}
        if theirs != ours:
            raise SystemExit(f"--merge: {path.name} was measured with {theirs}, this run uses {ours}")
        measured = {(r["cell"], r["budget"]) for r in rows}
        rows = [r for r in old["rows"] if (r["cell"], r["budget"]) not in measured] + rows
        commands = old["settings"]["command"].split(" && ") + commands
    data = {"settings": {"model": demo_lm.MODEL_SOURCE, "text": demo_lm.TEXT_SOURCE, "block": BLOCK,
                         "calibration_blocks": CALIBRATION_BLOCKS, "scale_blocks": SCALE_BLOCKS,
                         "eval_blocks": args.eval_blocks, "seq_len": seq_len, "reference": args.reference,
                         "command": " && ".join(commands)},
            "unpruned": {"perplexity": dense.perplexity.to_dict(), "block_nll": dense.stats.nll.tolist(),
                         "block_tokens": dense.stats.tokens.tolist()},
            "rows": rows, "environment": run_environment(load_before),
            "wall_seconds": time.perf_counter() - started}
    pair_rows(data)
    print(write_results(args.stem, data, markdown(data)))
    return 0


def block_stats(row: dict) -> BlockStats:
    """A stored row's per-block NLL and token counts, for ``paired_perplexity``."""
    return BlockStats(np.asarray(row["block_nll"]), np.asarray(row["block_tokens"]), None, None)


def pair_rows(data: dict) -> None:
    """Each row's ratio to the reference cell at its budget, paired over the same blocks."""
    ref = {r["budget"]: block_stats(r) for r in data["rows"] if r["cell"] == data["settings"]["reference"]}
    for row in data["rows"]:
        if row["budget"] in ref and row["cell"] != data["settings"]["reference"]:
            row["vs_reference"] = paired_perplexity(block_stats(row), ref[row["budget"]]).to_dict()
        else:
            row.pop("vs_reference", None)


def _cell_text(row: dict) -> str:
    text = f"{row['perplexity']['value']:,.1f}"
    paired = row.get("vs_reference")
    if paired:
        lo, hi = paired["ci95"]
        text += f" (x{paired['ratio']:.2f} [{lo:.2f}, {hi:.2f}])"
    return text


def markdown(data: dict) -> str:
    s = data["settings"]
    budgets = sorted({r["budget"] for r in data["rows"]}, reverse=True)
    cells = list(dict.fromkeys(r["cell"] for r in data["rows"]))
    dense = data["unpruned"]["perplexity"]
    lines = ["# Which neurons x how the rest is repaired: perplexity on the LM demo", "",
             f"Model: {s['model']}. Text: {s['text']}. Calibration: {s['calibration_blocks']} blocks of "
             f"{s['block']} tokens (repair fitted on the first {s['scale_blocks']}); evaluation: "
             f"{s['eval_blocks']} held-out blocks. Relative FLOPs counted at {s['seq_len']:.0f} tokens.",
             f"Unpruned perplexity {dense['value']:.2f} [{dense['ci95'][0]:.2f}, {dense['ci95'][1]:.2f}].", "",
             f"Cell: `score/allocation/repair/target`. Each entry: perplexity (ratio to `{s['reference']}` at "
             "the same budget on the same blocks [paired 95% bootstrap interval]); an interval entirely below 1 "
             "means the row is better than the reference.", "",
             "| cell | " + " | ".join(str(b) for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for cell in cells:
        entries = []
        for b in budgets:
            row = next((r for r in data["rows"] if r["cell"] == cell and r["budget"] == b), None)
            entries.append(_cell_text(row) if row else "")
        lines.append(f"| `{cell}` | " + " | ".join(entries) + " |")
    lines += ["", "Fewest neurons kept in one layer (of 1,536), per cell and budget: " + "; ".join(
        f"`{r['cell']}` @ {r['budget']}: {min(r['kept'])}" for r in data["rows"]) + ".", "",
        machine_line(data["environment"]), f"Command: `{s['command']}`; wall time {data['wall_seconds']:.0f} s"
        + (" (the last command)." if " && " in s["command"] else "."), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

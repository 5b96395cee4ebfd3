"""Does ``fluct-refit`` gain from a smoother allocation across layers? Perplexity on the LM demo.

``fluct-refit`` (the LM default when this was measured; now ``fluct-refit-curve``) spreads the budget over layers as FLAP does: per-layer z-scores of the
fluctuation score ranked together (``standardised``), which on the LM demo keeps ten layers whole and cuts
others to 923 of 1,536 at 0.9. This script keeps the score, the neurons' order within each layer and the
repair (``refit``, local target), and changes only how many neurons each layer keeps:

    kept_l = alpha * k / L + (1 - alpha) * standardised_l        (rounded; the total k is unchanged)

alpha 0 is ``fluct-refit`` itself, alpha 1 a uniform cut, between them a blend. Same FLOPs at every alpha
(every layer has the same width). Settings as ``bench_lm_grid.py`` (32 calibration blocks, 32 held-out
blocks); each row is paired over the same blocks with alpha 0 at its budget, and with the unpruned model.

    python benchmarks/bench_lm_allocation_blend.py --alphas 0,0.5,1 --budgets 0.9,0.8
    python benchmarks/bench_lm_allocation_blend.py --render-only

Needs the LM demo (``python -m kcm_core demo prepare lm``). Writes benchmarks/results/lm_allocation_blend.*.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from kcm_core.arch import model_shape  # noqa: E402
from kcm_core.demos import lm as demo_lm  # noqa: E402
from kcm_core.flops import relative_flops  # noqa: E402
from kcm_core.lm import evaluate_lm, paired_perplexity  # noqa: E402
from kcm_core.pipeline import compute_scores, make_plan, repair_plan, resolve_seq_len  # noqa: E402
from kcm_core.plan import KeepPlan  # noqa: E402
from kcm_core.realise import slice_model  # noqa: E402
from kcm_core.select import standardised  # noqa: E402
from bench_lm import load_demo  # noqa: E402
from bench_lm_grid import BLOCK, CALIBRATION_BLOCKS, SCALE_BLOCKS, block_stats  # noqa: E402
from common import cell_config, machine_line, rerender, run_environment, write_results  # noqa: E402

BASE_METHOD = "fluct-refit"          # the recipe measured: standardised allocation, refit (local)
STEM = "lm_allocation_blend"


def blended_counts(counts: list[int], widths: list[int], alpha: float) -> list[int]:
    """``counts`` moved a fraction ``alpha`` of the way to a uniform cut with the same total; the
    rounding remainder goes to the layers with the largest fractional parts (none above its width)."""
    k, n = sum(counts), len(counts)
    raw = [alpha * k / n + (1 - alpha) * c for c in counts]
    out = [min(w, int(r)) for r, w in zip(raw, widths)]
    for j in sorted(range(n), key=lambda j: int(raw[j]) - raw[j]) * 2:
        if sum(out) == k:
            break
        if out[j] < widths[j]:
            out[j] += 1
    return out


def plan_with_counts(z: list[torch.Tensor], counts: list[int], like: KeepPlan) -> KeepPlan:
    """Each layer's ``counts`` best neurons by its standardised score (the default's order)."""
    masks = []
    for score, c in zip(z, counts):
        mask = torch.zeros(score.numel(), dtype=torch.bool)
        mask[torch.argsort(score, descending=True)[:c]] = True
        masks.append(mask)
    return KeepPlan.from_masks(masks, method=like.method, info=like.info)


def pair_rows(data: dict) -> None:
    ref = {r["budget"]: block_stats(r) for r in data["rows"] if r["alpha"] == 0}
    for row in data["rows"]:
        if row["alpha"] != 0 and row["budget"] in ref:
            row["vs_default"] = paired_perplexity(block_stats(row), ref[row["budget"]]).to_dict()


def _entry(row: dict) -> str:
    text = f"{row['perplexity']:.2f}"
    if "vs_default" in row:
        p = row["vs_default"]
        text += f" (x{p['ratio']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}])"
    return f"{text}; {min(row['kept'])}"


def markdown(data: dict) -> str:
    s, dense = data["settings"], data["unpruned"]["perplexity"]
    budgets = sorted({r["budget"] for r in data["rows"]}, reverse=True)
    alphas = sorted({r["alpha"] for r in data["rows"]})
    lines = ["# Fluctuation + refit with a smoother allocation across layers", "",
             f"`{s['method']}` (fluctuation score, refit repair on the local target) on the LM demo, with each "
             "layer's kept count moved a fraction alpha of the way from the standardised (FLAP) allocation "
             "(alpha 0, `fluct-refit` itself) to a uniform cut (alpha 1); the neurons' order in each layer, the repair "
             f"and the FLOPs stay the same. Calibration: {s['calibration_blocks']} blocks of {s['block']} tokens; "
             f"evaluation: {s['eval_blocks']} held-out blocks (the grid's, `bench_lm_grid.py`). "
             f"Unpruned perplexity {dense['value']:.2f}.", "",
             "Each entry: perplexity (ratio to alpha 0 at the same budget on the same blocks [paired 95% bootstrap "
             "interval]); fewest neurons kept in one layer after the semicolon.", "",
             "| alpha | " + " | ".join(str(b) for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    rows = {(r["alpha"], r["budget"]): r for r in data["rows"]}
    for a in alphas:
        cells = [_entry(rows[(a, b)]) if (a, b) in rows else "" for b in budgets]
        label = {0: "0 (`fluct-refit`: standardised)", 1: "1 (uniform)"}.get(a, f"{a:g}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", machine_line(data["environment"]),
              f"Command: `{s['command']}`; wall time {data['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alphas", default="0,0.5,1")
    parser.add_argument("--budgets", default="0.9,0.8")
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    if args.render_only:
        return rerender(STEM, pair_rows, markdown)
    alphas = [float(a) for a in args.alphas.split(",")]
    if 0.0 not in alphas:
        alphas = [0.0] + alphas                   # the reference every row is paired with
    load_before, started = os.getloadavg(), time.perf_counter()
    torch.manual_seed(0)
    loaded = load_demo(args.eval_blocks, CALIBRATION_BLOCKS)
    if loaded is None:
        return 2
    model, _, calibration, evaluation = loaded
    shape = model_shape(model.config)
    seq_len = resolve_seq_len(shape, calibration, None)
    dense = evaluate_lm(model, evaluation)
    base = cell_config(BASE_METHOD, budget=0.9, scale_samples=SCALE_BLOCKS)
    scores = compute_scores(model, base, calibration)
    z = standardised(scores.scores)
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        config = replace(base, budget=budget)
        default = make_plan(model, scores, config, seq_len)
        for alpha in alphas:
            counts = blended_counts(default.kept_counts, default.widths, alpha)
            t = time.perf_counter()
            plan = repair_plan(model, plan_with_counts(z, counts, default), config,
                               config.repair_sample(calibration), scores.means)
            ev = evaluate_lm(slice_model(model, plan), evaluation)
            rows.append({"alpha": alpha, "budget": budget, "kept": counts, "perplexity": ev.perplexity.value,
                         "relative_flops": relative_flops(shape, seq_len, counts),
                         "block_nll": ev.stats.nll.tolist(), "block_tokens": ev.stats.tokens.tolist(),
                         "vs_unpruned": paired_perplexity(ev.stats, dense.stats).to_dict(),
                         "layer_errors": plan.info.repair_errors, "seconds": time.perf_counter() - t})
            print(f"{budget} alpha {alpha}: perplexity {ev.perplexity.value:.2f}", file=sys.stderr, flush=True)
    data = {"settings": {"method": BASE_METHOD, "model": demo_lm.MODEL_SOURCE, "block": BLOCK,
                         "calibration_blocks": CALIBRATION_BLOCKS, "eval_blocks": args.eval_blocks,
                         "seq_len": seq_len, "command": " ".join(["python"] + sys.argv)},
            "unpruned": {"perplexity": dense.perplexity.to_dict(), "block_nll": dense.stats.nll.tolist(),
                         "block_tokens": dense.stats.tokens.tolist()},
            "rows": rows, "environment": run_environment(load_before),
            "wall_seconds": time.perf_counter() - started}
    pair_rows(data)
    print(write_results(STEM, data, markdown(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

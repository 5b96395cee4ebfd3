"""How many neurons each layer keeps, from the refit's own error: ``fluct-refit`` re-allocated, LM demo.

``fluct-refit`` spreads the budget over layers as FLAP does (per-layer z-scores ranked together). This
script keeps its score's order within each layer and its repair (``refit``, local target) and changes
only the counts, from what the repair itself can reach: for each layer and every prefix of its order,
the ridge least-squares error ``F_l(k)`` the refit leaves when it keeps the ``k`` best neurons (from the
layer's centred, damped ``H^T H`` on the unpruned model: one Cholesky per layer, every ``k`` at once).
The counts minimise ``sum_l w_l F_l(k_l)`` for the same total; allocations (``--allocations``):

- ``standardised``: ``fluct-refit`` itself, the reference every row is paired with;
- ``relative`` / ``residual``: the curve with ``w_l = 1 / ||T_l||^2`` (the layer's FFN output) or
  ``1 / ||x_l||^2`` (the residual stream after it); ``--dry`` prints their counts (extreme: whole
  layers cut to a handful of neurons), they were not evaluated;
- ``normalised``: every token's error weighted by ``1 / ||x_t||^2``, ``x_t`` its residual stream after
  the layer (what the next norm divides by), ``w_l = 1``;
- ``normalised-half``: the mean of the ``normalised`` and ``standardised`` counts; this is what the
  library's ``--allocation curve`` computes (``kcm_core.curves``; its counts on the LM demo are these
  to the neuron at 0.9 and 0.8), the allocation of the language-model default ``fluct-refit-curve``.

Same FLOPs in every row (every layer has the same width). Settings as ``bench_lm_grid.py`` (32
calibration blocks, 32 held-out blocks); each row is paired with ``standardised`` at its budget on the
same blocks, and with the unpruned model.

    python benchmarks/bench_lm_allocation_error.py --allocations standardised,normalised,normalised-half --budgets 0.9,0.8
    python benchmarks/bench_lm_allocation_error.py --allocations standardised,normalised-half --budgets 0.95,0.85 --merge
    python benchmarks/bench_lm_allocation_error.py --render-only

Needs the LM demo (``python -m kcm_core demo prepare lm``). Writes benchmarks/results/lm_allocation_error.*.
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

from kcm_core.arch import ffn_blocks, model_shape, transformer_layers  # noqa: E402
from kcm_core.curves import curve, curve_counts, halfway, layer_order  # noqa: E402
from kcm_core.demos import lm as demo_lm  # noqa: E402
from kcm_core.flops import relative_flops  # noqa: E402
from kcm_core.lm import evaluate_lm, paired_perplexity  # noqa: E402
from kcm_core.pipeline import compute_scores, make_plan, repair_plan, resolve_seq_len  # noqa: E402
from kcm_core.realise import slice_model  # noqa: E402
from kcm_core.runtime import eval_mode, hooks, model_inputs, token_mask  # noqa: E402
from kcm_core.select import standardised  # noqa: E402
from bench_lm import load_demo  # noqa: E402
from bench_lm_allocation_blend import plan_with_counts  # noqa: E402
from bench_lm_grid import BLOCK, CALIBRATION_BLOCKS, SCALE_BLOCKS, block_stats  # noqa: E402
from common import (RESULTS, cell_config, machine_line, merge_budgets, rerender, run_environment,  # noqa: E402
                    write_results)

BASE_METHOD = "fluct-refit"          # the recipe measured: standardised allocation, refit (local)
STEM = "lm_allocation_error"


def layer_sums(model, batches):
    """Per layer: the down-projection inputs' ``H^T H`` (N, N) and token sums (N,) in float64, the
    token count, and the residual stream's summed squared norm after the layer."""
    blocks = ffn_blocks(model)
    _, layers = transformer_layers(model)
    grams = [torch.zeros(b.width, b.width, dtype=torch.float64) for b in blocks]
    h_sums = [torch.zeros(b.width, dtype=torch.float64) for b in blocks]
    # the same sums with each token weighted by 1 / ||x_t||^2, x_t the residual stream after the layer:
    # the error a token's FFN output takes, as the next layer's norm sees it
    w_grams = [torch.zeros(b.width, b.width, dtype=torch.float64) for b in blocks]
    w_h_sums = [torch.zeros(b.width, dtype=torch.float64) for b in blocks]
    w_counts = [0.0 for _ in blocks]
    stash = {}
    residual = [0.0 for _ in blocks]
    tokens, current = [0], {}

    def ffn_hook(i):
        def hook(_m, args):
            h = args[0][token_mask(current["batch"], args[0].shape, args[0].device)].double()
            grams[i].add_(h.t() @ h)
            h_sums[i].add_(h.sum(0))
            stash[i] = h
            if i == 0:
                tokens[0] += h.shape[0]
        return hook

    def layer_hook(i):
        def hook(_m, _args, out):
            x = out[0] if isinstance(out, tuple) else out
            x = x[token_mask(current["batch"], x.shape, x.device)].double()
            residual[i] += float((x * x).sum())
            h, wt = stash.pop(i), 1.0 / (x * x).sum(1).clamp_min(1e-12)
            w_grams[i].add_((h * wt[:, None]).t() @ h)
            w_h_sums[i].add_((h * wt[:, None]).sum(0))
            w_counts[i] += float(wt.sum())
        return hook

    handles = [b.down.register_forward_pre_hook(ffn_hook(i)) for i, b in enumerate(blocks)]
    handles += [layer.register_forward_hook(layer_hook(i)) for i, layer in enumerate(layers)]
    with hooks(handles), eval_mode(model), torch.no_grad():
        for batch in batches:
            current["batch"] = batch
            model(**model_inputs(batch, torch.device("cpu")))
    return grams, h_sums, tokens[0], residual, w_grams, w_h_sums, w_counts


def output_energy(gram, h_sum, n, w):
    """The layer's centred output energy ``||H W - mean||^2`` from its sums (the ``relative`` currency)."""
    mean = h_sum / n
    g = gram - n * torch.outer(mean, mean)
    w = w.double()
    return float((w * (g @ w)).sum())


def allocate(curves, weights, k):
    """``kcm_core.curves.curve_counts`` of the curves scaled by their layer's currency, no floor."""
    return curve_counts([wt * c for wt, c in zip(weights, curves)], k, [0] * len(curves))


LABELS = {"standardised": "standardised (`fluct-refit`)", "relative": "curve, relative to the FFN output",
          "residual": "curve, relative to the residual stream",
          "normalised": "curve, per-token normalised", "normalised-half": "halfway: standardised and normalised curve (`fluct-refit-curve`, the default)"}


def pair_rows(data: dict) -> None:
    ref = {r["budget"]: block_stats(r) for r in data["rows"] if r["allocation"] == "standardised"}
    for row in data["rows"]:
        if row["allocation"] != "standardised" and row["budget"] in ref:
            row["vs_default"] = paired_perplexity(block_stats(row), ref[row["budget"]]).to_dict()


def _entry(row: dict, dense: float) -> str:
    text = f"{row['perplexity']:.2f} ({row['perplexity'] / dense:.3f}x unpruned)"
    if "vs_default" in row:
        p = row["vs_default"]
        ratio = f"x{p['ratio']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}]"
        text += f", **{ratio}**" if p["ci95"][1] < 1 or p["ci95"][0] > 1 else f", {ratio}"
    return f"{text}; {min(row['kept'])}"


def markdown(data: dict) -> str:
    s, dense = data["settings"], data["unpruned"]["perplexity"]["value"]
    budgets = sorted({r["budget"] for r in data["rows"]}, reverse=True)
    names = [n for n in LABELS if any(r["allocation"] == n for r in data["rows"])]
    rows = {(r["allocation"], r["budget"]): r for r in data["rows"]}
    lines = ["# Fluctuation + refit with an allocation from each layer's refit-error curve", "",
             f"`{s['method']}` (fluctuation score, refit repair on the local target, damp {s['damp']:g}) on the LM "
             "demo; only the number of neurons each layer keeps changes (same total, same FLOPs; the order within "
             "each layer and the repair stay). A layer's curve is the ridge least-squares error the refit leaves "
             "when it keeps the first k neurons of the layer's order, for every k, from the unpruned model's "
             "centred, damped H^T H (one Cholesky per layer). The curve allocation minimises the summed error for "
             "the same total; *per-token normalised* weights each token's error by 1 / ||x_t||^2 (x_t: the residual "
             "stream after the layer, what the next norm divides by); *halfway* averages its counts with the "
             f"standardised ones. Calibration: {s['calibration_blocks']} blocks of {s['block']} tokens; evaluation: "
             f"{s['eval_blocks']} held-out blocks (the grid's, `bench_lm_grid.py`). Unpruned perplexity {dense:.2f}.", "",
             "Each entry: perplexity (ratio to the unpruned model), ratio to `fluct-refit` (standardised) at the same budget on the "
             "same blocks [paired 95% bootstrap interval; **bold**: it excludes 1]; fewest neurons kept in one "
             "layer after the semicolon.", "",
             "| allocation | " + " | ".join(str(b) for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for n in names:
        cells = [_entry(rows[(n, b)], dense) if (n, b) in rows else "" for b in budgets]
        lines.append(f"| {LABELS[n]} | " + " | ".join(cells) + " |")
    lines += ["", f"Curves computed in {s['curve_seconds']:.0f} s (both sets of sums, float64, one pass over the "
              "calibration blocks).", "", machine_line(data["environment"]),
              f"Command: `{s['command']}`; wall time {data['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--allocations", default="standardised,normalised,normalised-half")
    parser.add_argument("--budgets", default="0.9,0.8")
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--damp", type=float, default=1.0)
    parser.add_argument("--dry", action="store_true", help="print the counts, evaluate nothing")
    parser.add_argument("--merge", action="store_true", help="keep the stored rows of budgets not run now")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    if args.render_only:
        return rerender(STEM, pair_rows, markdown)
    load_before, started = os.getloadavg(), time.perf_counter()
    torch.manual_seed(0)
    model, _, calibration, evaluation = load_demo(args.eval_blocks, CALIBRATION_BLOCKS)
    shape = model_shape(model.config)
    seq_len = resolve_seq_len(shape, calibration, None)
    base = cell_config(BASE_METHOD, budget=0.9, scale_samples=SCALE_BLOCKS)
    scores = compute_scores(model, base, calibration)
    z = standardised(scores.scores)
    t = time.perf_counter()
    grams, h_sums, n, residual, w_grams, w_h_sums, w_counts = layer_sums(model, calibration)
    curves, out_energy, normalised = [], [], []
    for li, (score, block) in enumerate(zip(z, ffn_blocks(model))):
        order = layer_order(score)
        rows = block.down_rows().detach()
        curves.append(curve(grams[li], h_sums[li], n, rows, order, args.damp))
        out_energy.append(output_energy(grams[li], h_sums[li], n, rows))
        normalised.append(curve(w_grams[li], w_h_sums[li], w_counts[li], rows, order, args.damp))
    curve_seconds = time.perf_counter() - t
    print(f"curves: {curve_seconds:.1f} s", file=sys.stderr, flush=True)
    weights = {"relative": [1 / e for e in out_energy], "residual": [1 / r for r in residual]}
    dense = None if args.dry else evaluate_lm(model, evaluation)
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        config = replace(base, budget=budget)
        default = make_plan(model, scores, config, seq_len)
        k = sum(default.kept_counts)
        for name in args.allocations.split(","):
            if name == "standardised":
                counts = default.kept_counts
            elif name in ("normalised", "normalised-half"):
                counts = allocate(normalised, [1.0] * len(normalised), k)
                if name == "normalised-half":        # halfway between it and the standardised counts
                    counts = halfway(default.kept_counts, counts)
            else:
                counts = allocate(curves, weights[name], k)
            print(f"{budget} {name}: {counts}", file=sys.stderr, flush=True)
            if args.dry:
                continue
            t = time.perf_counter()
            plan = repair_plan(model, plan_with_counts(z, counts, default), config,
                               config.repair_sample(calibration), scores.means)
            ev = evaluate_lm(slice_model(model, plan), evaluation)
            rows.append({"allocation": name, "budget": budget, "kept": counts,
                         "perplexity": ev.perplexity.value,
                         "relative_flops": relative_flops(shape, seq_len, counts),
                         "block_nll": ev.stats.nll.tolist(), "block_tokens": ev.stats.tokens.tolist(),
                         "vs_unpruned": paired_perplexity(ev.stats, dense.stats).to_dict(),
                         "layer_errors": plan.info.repair_errors, "seconds": time.perf_counter() - t})
            print(f"{budget} {name}: perplexity {ev.perplexity.value:.2f}", file=sys.stderr, flush=True)
    if args.dry:
        return 0
    data = {"settings": {"method": BASE_METHOD, "model": demo_lm.MODEL_SOURCE, "block": BLOCK,
                         "calibration_blocks": CALIBRATION_BLOCKS, "eval_blocks": args.eval_blocks,
                         "damp": args.damp, "seq_len": seq_len, "curve_seconds": curve_seconds,
                         "command": " ".join(["python"] + sys.argv)},
            "unpruned": {"perplexity": dense.perplexity.to_dict(), "block_nll": dense.stats.nll.tolist(),
                         "block_tokens": dense.stats.tokens.tolist()},
            "rows": rows, "environment": run_environment(load_before),
            "wall_seconds": time.perf_counter() - started}
    path = RESULTS / f"{STEM}.json"
    if args.merge:
        merge_budgets(data, path)
    pair_rows(data)
    print(write_results(STEM, data, markdown(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

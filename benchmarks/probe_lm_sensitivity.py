"""Probe: does weighting each layer's refit-error curve by how much that layer's error moves the model's
output give a better allocation than the default's halfway counts? LM demo, ``fluct-refit-curve``.

The default (``--allocation curve``) keeps, per layer, halfway between the standardised counts and the
counts that minimise ``sum_l F_l(k_l)``, ``F_l`` the layer's per-token normalised refit-error curve
(``kcm_core.curves``). Every layer's error counts the same there, which is why the curve alone is not
better: an error in one layer costs the output more than the same error in another. This probe
measures that cost, label-free and without gradients: for each layer ``l`` it prunes that layer alone
as the default plan at ``--probe-budget`` (0.8) does (its kept neurons and refitted rows), and measures
the KL divergence from the unpruned model's next-token distribution on the first ``--kl-blocks`` (8)
calibration blocks. The layer's weight is ``w_l = KL_l / F_l(p_l)`` (``p_l`` that plan's count; a layer
it cuts by less than 3% gets the median weight: one neuron's KL is noise). At each budget the
allocations are:

- ``default``: ``fluct-refit-curve`` as the library computes it (the reference every row is paired with);
- ``sensitivity``: the counts that minimise ``sum_l w_l F_l(k_l)`` for the same total;
- ``sensitivity-half``: the mean of those and the standardised counts (the default's blend, new curve).

Calibration: the grid's 32 blocks (scores, curves, refit and the KL); evaluation: its 32 held-out
blocks, paired with ``default`` on the same blocks. Writes benchmarks/results/probe_lm_sensitivity.json.

    python benchmarks/probe_lm_sensitivity.py --budgets 0.9,0.8
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402

from kcm_core.arch import model_shape  # noqa: E402
from kcm_core.curves import curve_counts, halfway  # noqa: E402
from kcm_core.lm import evaluate_lm, paired_perplexity  # noqa: E402
from kcm_core.pipeline import compute_scores, make_plan, repair_plan, resolve_seq_len  # noqa: E402
from kcm_core.plan import KeepPlan, LayerKeep  # noqa: E402
from kcm_core.realise import slice_model  # noqa: E402
from kcm_core.select import standardised  # noqa: E402
from bench_lm import load_demo  # noqa: E402
from bench_lm_allocation_blend import plan_with_counts  # noqa: E402
from bench_lm_grid import CALIBRATION_BLOCKS, SCALE_BLOCKS, block_stats  # noqa: E402
from common import RESULTS, cell_config, merge_budgets, run_environment  # noqa: E402

METHOD = "fluct-refit-curve"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def one_layer(plan: KeepPlan, layer: int) -> KeepPlan:
    """``plan``'s decision for ``layer`` alone; every other layer whole."""
    layers = tuple(keep if i == layer else LayerKeep(tuple(range(keep.width)), keep.width)
                   for i, keep in enumerate(plan.layers))
    return KeepPlan(layers, method=plan.method, info=plan.info)


def layer_weights(model, probe_plan, probe_counts, curves, kl_batches):
    """Per layer, the KL of the model with that layer alone pruned as ``probe_plan`` prunes it, and the
    weight KL / curve error at its count (None for a layer cut by less than 3%)."""
    kl, weights = [], []
    for layer, (kept, c) in enumerate(zip(probe_counts, curves)):
        width = c.numel() - 1
        if kept > 0.97 * width:
            kl.append(None)
            weights.append(None)
            continue
        ev = evaluate_lm(slice_model(model, one_layer(probe_plan, layer)), kl_batches, reference=model)
        kl.append(float(ev.kl.value))
        weights.append(max(kl[-1], 1e-9) / max(float(c[kept]), 1e-12))
        log(f"layer {layer}: kept {kept}, KL {kl[-1]:.5f}, curve error {float(c[kept]):.4g}, "
            f"weight {weights[-1]:.4g}")
    return kl, weights


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", default="0.9,0.8")
    parser.add_argument("--eval-blocks", type=int, default=32)
    parser.add_argument("--probe-budget", type=float, default=0.8)
    parser.add_argument("--kl-blocks", type=int, default=8, help="calibration blocks the KL is measured on")
    parser.add_argument("--weights", help="a JSON file with the layers' KL and weights from an earlier run "
                                          "(layer_kl, layer_weight; null where not measured): measure none")
    parser.add_argument("--merge", action="store_true", help="keep the stored rows of budgets not run now")
    args = parser.parse_args()
    load_before, started = os.getloadavg(), time.perf_counter()
    torch.manual_seed(0)
    model, _, calibration, evaluation = load_demo(args.eval_blocks, CALIBRATION_BLOCKS)
    seq_len = resolve_seq_len(model_shape(model.config), calibration, None)
    base = cell_config(METHOD, budget=0.9, scale_samples=SCALE_BLOCKS)
    scores = compute_scores(model, base, calibration)
    z = standardised(scores.scores)
    curves = scores.curves
    dense = evaluate_lm(model, evaluation)
    rows = []
    # the weights: each layer pruned alone as the default plan at --probe-budget prunes it (its kept
    # neurons and refitted rows)
    t = time.perf_counter()
    if args.weights:
        stored = json.loads(Path(args.weights).read_text())
        kl, weights = stored["layer_kl"], stored["layer_weight"]
        log(f"weights read from {args.weights}")
    else:
        probe = replace(base, budget=args.probe_budget)
        probe_plan = repair_plan(model, make_plan(model, scores, probe, seq_len), probe,
                                 probe.repair_sample(calibration), scores.means)
        kl_batches = calibration[:max(1, args.kl_blocks // 4)]           # batches of 4 blocks
        kl, weights = layer_weights(model, probe_plan, list(probe_plan.kept_counts), curves, kl_batches)
    kl_seconds = time.perf_counter() - t
    median = float(torch.tensor([w for w in weights if w is not None]).median())
    weights = [median if w is None else w for w in weights]
    for budget in [float(b) for b in args.budgets.split(",")]:
        config = replace(base, budget=budget)
        unrepaired = make_plan(model, scores, config, seq_len)
        default = repair_plan(model, unrepaired, config, config.repair_sample(calibration), scores.means)
        counts = list(default.kept_counts)
        std_counts = list(make_plan(model, scores, replace(config, allocation="standardised"), seq_len).kept_counts)
        sens = curve_counts([w * c for w, c in zip(weights, curves)], sum(counts), [0] * len(counts))
        allocations = {"default": counts, "sensitivity": sens, "sensitivity-half": halfway(std_counts, sens)}
        for name, kept in allocations.items():
            log(f"{budget} {name}: {kept}")
            plan = default if name == "default" else repair_plan(
                model, plan_with_counts(z, kept, unrepaired), config, config.repair_sample(calibration), scores.means)
            ev = evaluate_lm(slice_model(model, plan), evaluation)
            rows.append({"allocation": name, "budget": budget, "kept": kept, "perplexity": ev.perplexity.value,
                         "block_nll": ev.stats.nll.tolist(), "block_tokens": ev.stats.tokens.tolist(),
                         "vs_unpruned": paired_perplexity(ev.stats, dense.stats).to_dict()})
            if name != "default":
                ref = next(r for r in rows if r["budget"] == budget and r["allocation"] == "default")
                rows[-1]["vs_default"] = paired_perplexity(block_stats(rows[-1]), block_stats(ref)).to_dict()
            log(f"{budget} {name}: perplexity {ev.perplexity.value:.2f} "
                f"{rows[-1].get('vs_default', {}).get('ratio', '')}")
    data = {"settings": {"method": METHOD, "calibration_blocks": CALIBRATION_BLOCKS, "eval_blocks": args.eval_blocks,
                         "command": " ".join(["python"] + sys.argv)},
            "unpruned": {"perplexity": dense.perplexity.to_dict()}, "rows": rows,
            "weights": {"probe_budget": args.probe_budget, "kl_blocks": args.kl_blocks, "read_from": args.weights,
                        "layer_kl": kl, "layer_weight": weights, "seconds": kl_seconds},
            "environment": run_environment(load_before), "wall_seconds": time.perf_counter() - started}
    path = RESULTS / "probe_lm_sensitivity.json"
    if args.merge:
        merge_budgets(data, path)
    path.write_text(json.dumps(data, indent=1))
    for r in rows:
        v = r.get("vs_default")
        log(f"{r['budget']} {r['allocation']}: {r['perplexity']:.2f}"
            + (f" x{v['ratio']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]" if v else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

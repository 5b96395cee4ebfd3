"""Probe: the default LM recipe with a refit that weights each token by 1 / ||x_t||^2.

The refit (``kcm_core.repair``) minimises the plain squared error of each pruned FFN's output over the
calibration tokens, so the few tokens with massive residual activations (the first token of a block)
dominate it. The next layer's RMSNorm divides each token by its norm, so what a token's error does
downstream scales with ``||e_t||^2 / ||x_t||^2``. This probe weights every token's row of the
least-squares problem by ``1 / ||x_t||^2`` (``x_t``: the residual stream entering the layer, rescaled so
the weights of a batch sum to its token count) and leaves everything else as the default: score,
allocation, damping, the local target. Paired with the default's stored rows on the same 32 held-out
blocks (``results/lm_allocation_blend.json``, alpha 0, reproduced to the digit by
``bench_lm_allocation_error.py`` today).

    python benchmarks/probe_weighted_refit.py --budgets 0.9,0.8
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

import kcm_core.repair as R  # noqa: E402
from kcm_core.lm import evaluate_lm, paired_perplexity  # noqa: E402
from kcm_core.pipeline import compute_scores, make_plan, repair_plan, resolve_seq_len  # noqa: E402
from kcm_core.arch import model_shape  # noqa: E402
from kcm_core.realise import slice_model  # noqa: E402
from kcm_core.runtime import model_device, token_mask  # noqa: E402
from kcm_core.layer_replay import StopForward, run_layer  # noqa: E402
from bench_lm import load_demo  # noqa: E402
from bench_lm_grid import CALIBRATION_BLOCKS, SCALE_BLOCKS, block_stats  # noqa: E402
from common import RESULTS, cell_config, run_environment  # noqa: E402


BASE_METHOD = "fluct-refit"          # the recipe measured: standardised allocation, refit (local)

def weighted_accumulate(student, layers, li, block, keep, original, batches, recorded, target):
    """``kcm_core.repair._accumulate`` with every token weighted by 1 / ||x_t||^2 (local target only)."""
    assert target is None
    device = model_device(student)
    k, d = len(keep), original.shape[1]
    keep_t = torch.tensor(keep, dtype=torch.long, device=device)
    w_full = original.to(device=device, dtype=torch.float32)
    sums = R._LayerSums(torch.zeros(k, k, dtype=torch.float64), torch.zeros(k, d, dtype=torch.float64),
                        torch.zeros(k, dtype=torch.float64), torch.zeros(d, dtype=torch.float64),
                        torch.zeros((), dtype=torch.float64))
    cursor = {"b": 0}
    residual = {}

    def layer_pre(_m, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        residual["norm2"] = (x.float() ** 2).sum(-1)                                 # (B, T)

    def stop_hook(module):
        def hook(_module, args):
            h_all = args[0]
            mask = token_mask(batches[cursor["b"]], h_all.shape, h_all.device)
            cursor["b"] += 1
            wt = 1.0 / residual["norm2"][mask].clamp_min(1e-12)
            wt = wt * (wt.numel() / wt.sum())
            h_all = h_all[mask].float()
            t = h_all @ w_full
            h = h_all[:, keep_t]
            hw = h * wt[:, None]
            sums.gram.add_((hw.t() @ h).double())
            sums.cross.add_((hw.t() @ t).double())
            sums.h_sum.add_(hw.sum(0).double())
            sums.t_sum.add_((t * wt[:, None]).sum(0).double())
            sums.t_sq.add_((t.double().pow(2).sum(1) * wt.double()).sum())
            sums.tokens += h.shape[0]
            raise StopForward
        return module.register_forward_pre_hook(hook)

    handle = layers[li].register_forward_pre_hook(layer_pre, with_kwargs=True)
    try:
        run_layer(student, layers, li, batches, recorded, block.down, stop_hook)
    finally:
        handle.remove()
    return sums


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budgets", default="0.9,0.8")
    args = parser.parse_args()
    load_before, started = os.getloadavg(), time.perf_counter()
    torch.manual_seed(0)
    model, _, calibration, evaluation = load_demo(32, CALIBRATION_BLOCKS)
    seq_len = resolve_seq_len(model_shape(model.config), calibration, None)
    stored = json.loads((RESULTS / "lm_allocation_blend.json").read_text())
    base = cell_config(BASE_METHOD, budget=0.9, scale_samples=SCALE_BLOCKS)
    scores = compute_scores(model, base, calibration)
    R._accumulate = weighted_accumulate
    out = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        config = replace(base, budget=budget)
        plan = repair_plan(model, make_plan(model, scores, config, seq_len), config,
                           config.repair_sample(calibration), scores.means)
        ev = evaluate_lm(slice_model(model, plan), evaluation)
        ref = next(r for r in stored["rows"] if r["alpha"] == 0 and r["budget"] == budget)
        vs = paired_perplexity(ev.stats, block_stats(ref)).to_dict()
        dense = paired_perplexity(ev.stats, block_stats(stored["unpruned"])).to_dict()
        out.append({"budget": budget, "perplexity": ev.perplexity.value, "default": ref["perplexity"],
                    "vs_default": vs, "vs_unpruned": dense, "block_nll": ev.stats.nll.tolist(),
                    "block_tokens": ev.stats.tokens.tolist(), "layer_errors": plan.info.repair_errors})
        print(f"{budget}: {ev.perplexity.value:.2f} (default {ref['perplexity']:.2f}; x{vs['ratio']:.3f} "
              f"{vs['ci95']}; x{dense['ratio']:.3f} unpruned)", flush=True)
    (RESULTS / "probe_weighted_refit.json").write_text(json.dumps(
        {"rows": out, "environment": run_environment(load_before), "wall_seconds": time.perf_counter() - started,
         "command": " ".join(["python"] + sys.argv)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

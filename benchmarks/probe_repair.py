"""A quick probe of repair options on the LM demo: perplexity on 8 held-out blocks, one run per spec.

Each spec is ``method:allocation:repair:target:scale_samples:damp``; the refit repair fits on every
calibration block (``PruneConfig.refit_samples``), the others on ``scale_samples`` blocks. It prints one
line per spec with the mean over layers of the relative error each pruned layer leaves in its output,
before and after the repair. Used to pick refit's damping and target before the paired grid
(``bench_lm_grid.py``); its lines from 2026-12-07 are in ``results/repair_probe.log``.

    python benchmarks/probe_repair.py flap:pooled:refit:local:32:1.0,flap:pooled:bias:local:8:1 0.9 [32]
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kcm_core.config import PruneConfig  # noqa: E402
from kcm_core.lm import evaluate_lm  # noqa: E402
from kcm_core.pipeline import compute_scores, prune  # noqa: E402
from kcm_core.repair import RepairConfig  # noqa: E402
from bench_lm import load_demo  # noqa: E402


def main(argv: list[str]) -> int:
    specs = [a.split(":") for a in argv[0].split(",")]
    budget = float(argv[1])
    loaded = load_demo(8, int(argv[2]) if len(argv) > 2 else 32)
    if loaded is None:
        return 2
    model, _, calibration, evaluation = loaded
    shared: dict = {}
    for name, allocation, kind, target, samples, damp in specs:
        config = PruneConfig(method=name, budget=budget, allocation=allocation, scale_samples=int(samples),
                             repair=RepairConfig(kind, target, float(damp)))
        start = time.time()
        result = prune(model, config, calibration, method_scores=compute_scores(model, config, calibration,
                                                                                 shared=shared))
        seconds = time.time() - start
        ppl = evaluate_lm(result.model, evaluation).perplexity.value
        errors = result.plan.info.repair_errors
        said = "" if not errors else " err before/after (mean) %.3f/%.3f" % (
            sum(a for a, _ in errors) / len(errors), sum(b for _, b in errors) / len(errors))
        print(f"{':'.join([name, allocation, kind, target, samples, damp])} @ {budget}: ppl {ppl:.2f} "
              f"[{seconds:.0f}s]{said}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

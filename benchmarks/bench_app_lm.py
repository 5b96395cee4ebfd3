"""A new budget on the real LM demo, the way the Prune page computes it (kcm at 0.9, then 0.85 with the
scores stored): wall time of engine.evaluate_budget per stage, and of the generation panel.
Writes benchmarks/results/app_lm_budget.json. Needs the prepared LM demo (python -m kcm_core demo prepare lm).
"""
import os, sys, time, json
from pathlib import Path
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import torch
from kcm_app import resources, engine
from kcm_app.sources import ModelChoice, DataChoice, SampleChoice, LM_CALIBRATION_BLOCKS
from kcm_core.pipeline import PruneConfig
out = {}
t = time.perf_counter()
ws = resources.workspace(ModelChoice("demo-lm"), DataChoice("demo-lm"), SampleChoice(LM_CALIBRATION_BLOCKS, 256, 0))
out["workspace_s"] = time.perf_counter() - t
store = resources.store("results")
t = time.perf_counter(); dense = engine.reference_lm(ws, store); out["dense_eval_s"] = time.perf_counter() - t
out["dense_ppl"] = dense.perplexity.to_dict()
for b in (0.9, 0.85):
    cfg = PruneConfig(method="kcm", budget=b, scale_samples=engine.scale_samples(ws), seed=0)
    t = time.perf_counter(); r = engine.evaluate_budget(ws, cfg, store)
    out[f"kcm_{b}"] = {"wall_s": time.perf_counter() - t, "seconds": r.seconds,
                       "perplexity": r.perplexity.to_dict(), "agreement": r.agreement.to_dict(),
                       "kl": r.kl.to_dict(), "relative_flops": r.relative_flops}
    t = time.perf_counter(); g = engine.continuations(ws, cfg, engine.DEFAULT_PROMPT, store)
    out[f"gen_{b}_s"] = time.perf_counter() - t
    out[f"gen_{b}"] = {"dense": g.dense, "pruned": g.pruned}
    print(json.dumps(out, indent=1, default=str), flush=True)
out["threads"] = torch.get_num_threads()
print(json.dumps(out, indent=1, default=str))
json.dump(out, open(ROOT / "benchmarks/results/app_lm_budget.json", "w"), indent=1, default=str)

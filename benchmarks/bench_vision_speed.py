"""The vision demo's whole runs and its pruned speed: how long the image default (``fluct-refit``) and
the paper's KCM take from an unpruned ViT to a sliced one, and how much faster the sliced ViT runs.

Subject: the vision demo (``python -m kcm_core demo prepare vision``; exit code 2 without it), a stock
``ViTForImageClassification`` at 84 px (36 patches + 1 token per image). Calibration: 512 training
images (seed 0), as ``prune --model demo-vision`` draws by default.

- **Whole run**: ``kcm_core.pipeline.prune`` from nothing to the sliced model at ``--budget`` (scoring,
  selection, repair, slicing; no evaluation), wall and process CPU time, once per method, in this
  process with ``--threads`` threads.
- **Speed**: the unpruned ViT and each pruned one on the same batch of ``--batch`` images, in rotating
  rounds (``bench_speed.time_round_robin``: load drift hits every model alike); a speedup is the median
  of the per-round ratios unpruned / pruned, with a bootstrap interval over rounds. The issue's goal:
  at least 1.5x at 0.6, batch 32.

    python benchmarks/bench_vision_speed.py [--budget 0.6] [--threads 2] [--repeats 15]

Writes benchmarks/results/vision_speed.json and .md. Progress on stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # read when torch loads OpenMP: before the import
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_speed import speedups, time_round_robin, torch_runner  # noqa: E402
from common import machine_state, run_environment, write_results  # noqa: E402
from kcm_core.arch import model_shape  # noqa: E402
from kcm_core.flops import relative_flops  # noqa: E402
from kcm_core.methods import DEFAULT_VISION_METHOD  # noqa: E402
from kcm_core.pipeline import PruneConfig, prune  # noqa: E402

METHODS = (DEFAULT_VISION_METHOD, "kcm")
SPEED_GOAL = 1.5
TIME_GOAL_S = 120.0          # the goal for KCM's whole run, on two idle cores


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.6)
    parser.add_argument("--samples", type=int, default=512, help="calibration images (the CLI's default)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    from kcm_core.data import labels_for_model
    from kcm_core.demos import vision
    from kcm_core.images import image_batches
    from kcm_core.models import load_model
    summary = vision.stored_summary()
    if summary is None:
        log("the vision demo is not prepared; run `python -m kcm_core demo prepare vision` first")
        return 2
    torch.set_num_threads(args.threads)
    started, load_before = time.perf_counter(), os.getloadavg()
    model, processor = load_model(summary["model_dir"], device="cpu")
    train = labels_for_model(vision.load_vision_split("train"), model.config)
    sample = train.sample(args.samples, 0)
    unlabeled = image_batches(sample, processor, model.config, batch_size=64, with_labels=False)
    shape = model_shape(model.config)

    runs, variants = {}, {"unpruned": model.eval()}
    for name in METHODS:
        log(f"{name}: the whole run to {args.budget} of the FLOPs")
        load = os.getloadavg()[0]
        t, c = time.perf_counter(), time.process_time()
        result = prune(model, PruneConfig(method=name, budget=args.budget, seed=0), unlabeled)
        runs[name] = {"wall_s": time.perf_counter() - t, "cpu_s": time.process_time() - c, "load_before": load,
                      "load_after": os.getloadavg()[0], "seconds": dict(result.seconds),
                      "kept_per_layer": result.plan.kept_counts,
                      "relative_flops": relative_flops(shape, result.seq_len, result.plan.kept_counts)}
        log(f"    {runs[name]['wall_s']:.0f} s wall, {runs[name]['cpu_s']:.0f} s CPU")
        variants[name] = result.model.eval()

    pixels = image_batches(sample.subset(range(args.batch)), processor, model.config, batch_size=args.batch,
                           with_labels=False)[0]
    inputs = {"pixel_values": pixels["pixel_values"]}
    log(f"timing: batch {args.batch}, {len(variants)} models, {args.repeats} rounds")
    timing = time_round_robin({n: torch_runner(m, inputs) for n, m in variants.items()}, args.warmup, args.repeats)
    speed = [{"model": n, **{k: v for k, v in timing[n].items()},
              **speedups(timing["unpruned"], timing[n]),
              "ideal_speedup": 1.0 / runs[n]["relative_flops"] if n in runs else 1.0} for n in variants]
    env = run_environment(load_before, threads=args.threads, omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
    data = {"command": " ".join(["python", "benchmarks/bench_vision_speed.py", *sys.argv[1:]]),
            "budget": args.budget, "samples": args.samples, "batch": args.batch, "tokens": shape.image_tokens,
            "runs": runs, "speed": speed, "environment": env, "wall_seconds": time.perf_counter() - started}
    print(write_results("vision_speed", data, markdown(data)))
    return 0


def markdown(data: dict) -> str:
    env, b = data["environment"], data["budget"]
    lines = ["# The vision demo: whole runs and pruned speed", "",
             f"Vision demo (a stock ViT at 84 px, {data['tokens']} tokens per image), {data['samples']} calibration "
             f"images, relative FLOPs {b}. {env.get('cpu')}, {env['threads']} threads, torch {env['torch']}; "
             f"{machine_state(env)}.", "",
             "## Whole run (scoring, selection, repair, slicing; no evaluation)", "",
             "| method | wall (s) | CPU (s) | stages (s) | load before / after | goal |", "|---|---|---|---|---|---|"]
    for name, r in data["runs"].items():
        stages = ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items() if v >= 0.5)
        goal = "" if name != "kcm" else (f"under {TIME_GOAL_S:.0f} s on two idle cores: "
                                         + ("met in this run" if r["wall_s"] < TIME_GOAL_S else "not met in this run"))
        lines.append(f"| `{name}` | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {stages} | "
                     f"{r['load_before']:.1f} / {r['load_after']:.1f} | {goal} |")
    lines += ["", f"## Speed (batch {data['batch']}, PyTorch, median of per-round ratios over the same rounds)", "",
              "| model | median (ms) | speedup [95% interval] | CPU speedup | ideal (1 / relative FLOPs) |",
              "|---|---|---|---|---|"]
    for r in data["speed"]:
        lo, hi = r["speedup_ci95"]
        lines.append(f"| {r['model']} | {r['median_ms']:.0f} | x{r['speedup']:.2f} [{lo:.2f}, {hi:.2f}] | "
                     f"x{r['cpu_speedup']:.2f} | x{r['ideal_speedup']:.2f} |")
    pruned = [r for r in data["speed"] if r["model"] != "unpruned"]
    verdicts = "; ".join(f"{r['model']}: " + ("met" if r["speedup_ci95"][0] >= SPEED_GOAL else "not shown")
                         for r in pruned)
    lines += ["", f"Goal, at least x{SPEED_GOAL} at 0.6 with batch 32 (the interval's lower end): {verdicts}.", "",
              f"Command: `{data['command']}`; this run took {data['wall_seconds']:.0f} s.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""One process against two gloo ranks under torchrun, on the LM demo (SmolLM2-135M, 30 layers x 1536):
the same `prune` command line run both ways, the saved plans compared (kept neurons per layer, scales),
and the wall time of each stage from the two reports.

    python benchmarks/bench_distributed.py [--samples 16] [--max-iter 10] [--eval-blocks 4] [--threads 1]

Every process gets ``--threads`` intra-op threads (OMP_NUM_THREADS, as torchrun sets for each rank),
so the two ranks together use twice the threads of the single process: on this 2-core machine the
ratio says what a second core per rank buys, not what a second machine or GPU would. The evaluation
is not split (rank 0 alone), so its ratio is the control: it shows how far the two runs' conditions
(the load of a shared machine) differed. ``--max-iter`` caps R2's iterations to keep the run short
(the distributed code path is the same at any cap). Needs the LM demo
(``python -m kcm_core demo prepare lm``). Writes benchmarks/results/distributed.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from kcm_core.demos import lm as demo_lm  # noqa: E402
from kcm_core.report import Environment  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
STAGES = ("load", "r2", "d2", "scoring", "selection", "scaling", "slicing", "evaluation")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(launcher: list[str], prune_args: list[str], out: Path, env: dict) -> dict:
    command = [*launcher, "-m", "kcm_core", "prune", *prune_args, "--out", str(out / "model"),
               "--json", str(out / "report.json")]
    log("$ " + " ".join(command))
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "model" / "kcm_plan.json").read_text())
    return {"command": " ".join(command), "wall_s": wall, "seconds": report["seconds"],
            "data": report["data"], "plan": plan,
            "perplexity_after": report["evaluation"]["after"]["perplexity"]["value"]}


def compare(single: dict, dist: dict) -> dict:
    a, b = single["plan"]["layers"], dist["plan"]["layers"]
    same_layers = sum(x["keep_idx"] == y["keep_idx"] for x, y in zip(a, b))
    diffs = [abs(s - t) for x, y in zip(a, b) if x["scales"] and y["scales"]
             for s, t in zip(x["scales"], y["scales"])]
    return {"layers": len(a), "layers_with_identical_kept_neurons": same_layers,
            "kept_single": sum(len(x["keep_idx"]) for x in a), "kept_distributed": sum(len(y["keep_idx"]) for y in b),
            "max_abs_scale_difference": max(diffs) if diffs else None,
            "scaled_layers": [single["plan"]["info"]["scaled_layers"], dist["plan"]["info"]["scaled_layers"]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=16, help="calibration blocks of 256 tokens")
    parser.add_argument("--max-iter", type=int, default=10, help="R2 iteration cap")
    parser.add_argument("--eval-blocks", type=int, default=4)
    parser.add_argument("--budget", type=float, default=0.8)
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads of every process")
    args = parser.parse_args()
    if demo_lm.stored_summary() is None:
        log("the LM demo is not prepared: python -m kcm_core demo prepare lm")
        return 2
    prune_args = ["--model", "demo-lm", "--data", "demo-lm", "--flops", str(args.budget), "--method", "kcm",
                  "--samples", str(args.samples), "--eval-blocks", str(args.eval_blocks),
                  "--max-iter", str(args.max_iter)]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = str(args.threads)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        single = run([sys.executable], prune_args, Path(tmp) / "single", env)
        dist = run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"], prune_args,
                   Path(tmp) / "dist", env)
    data = {"settings": {**vars(args), "command": " ".join(["python"] + sys.argv),
                         "threads": f"{args.threads} intra-op thread(s) per process (1 process; 2 ranks)"},
            "single": {k: v for k, v in single.items() if k != "plan"},
            "distributed": {k: v for k, v in dist.items() if k != "plan"},
            "agreement": compare(single, dist),
            "environment": {**asdict(Environment.here()), "load_average_before": list(load_before),
                            "load_average_after": list(os.getloadavg())}}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "distributed.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "distributed.md").write_text(markdown(data))
    print(markdown(data))
    return 0


def markdown(data: dict) -> str:
    s, g, env = data["settings"], data["agreement"], data["environment"]
    one, two = data["single"], data["distributed"]
    lines = ["# One process against two gloo ranks (torchrun) on the LM demo", "",
             f"`prune --method kcm --flops {s['budget']}` on SmolLM2-135M, {s['samples']} calibration blocks of "
             f"256 tokens, R2 capped at {s['max_iter']} iterations, {s['eval_blocks']} evaluation blocks. "
             f"Threads: {s['threads']}.", "",
             "## Same result", "",
             f"- Layers whose kept neurons are identical: {g['layers_with_identical_kept_neurons']} of {g['layers']} "
             f"(kept {g['kept_single']} in one process, {g['kept_distributed']} with two ranks).",
             f"- Largest difference between a neuron's scale in the two runs: {g['max_abs_scale_difference']:.2e}; "
             f"scaled layers {g['scaled_layers'][0]} and {g['scaled_layers'][1]}.",
             f"- Held-out perplexity after pruning: {one['perplexity_after']:.4f} and {two['perplexity_after']:.4f}.", "",
             "## Wall time per stage (seconds, from each run's report; rank 0's clock)", "",
             "| stage | 1 process | 2 ranks | 2 ranks / 1 process |", "|---|---|---|---|"]
    for stage in STAGES:
        a, b = one["seconds"].get(stage), two["seconds"].get(stage)
        if a is not None and b is not None:
            lines.append(f"| {stage} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    lines.append(f"| whole command (wall) | {one['wall_s']:.1f} | {two['wall_s']:.1f} | "
                 f"{two['wall_s'] / one['wall_s']:.2f} |")
    control = two["seconds"]["evaluation"] / one["seconds"]["evaluation"]
    lines += ["", f"`evaluation` is not split (rank 0 alone in both runs): its ratio, {control:.2f}, is the "
              "control for how far the two runs' conditions differed on this shared machine; a split stage "
              "gained from the second rank only as far as its ratio is below that. `load` includes each "
              "process's start. Both runs share the same 2 cores; one GPU or machine per rank was not "
              "measured (no GPU here).", "",
              f"Machine: {env['cpu']}, {env['logical_cpus']} logical CPUs, torch {env['torch']}; load average "
              f"before {env['load_average_before'][0]:.1f}, after {env['load_average_after'][0]:.1f} (the machine "
              "was shared with other jobs; above about 2 they competed for the 2 cores).",
              f"Command: `{s['command']}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

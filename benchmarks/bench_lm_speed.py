"""Speed of the LM demo pruned by KCM against the dense model: prefill latency and greedy generation
tokens per second, batch 1 and batch 8, dense and pruned interleaved in paired rounds.

    python benchmarks/bench_lm_speed.py [--budget 0.8] [--rounds 5] [--new-tokens 32]

    python benchmarks/bench_lm_speed.py --render-only      # lm_speed.md again from lm_speed.json

The pruned model is KCM at ``--budget`` relative FLOPs (scored on 32 calibration blocks, scaled on 8,
physically sliced). Each round times dense then pruned on the same input; the speedup is given per
round, and the result states the median over rounds with a seeded bootstrap interval over rounds
(``common.ratio_interval``) and the range; the goal (at least 1.15x the tokens per second at batch 1)
counts as met only when the interval's lower end clears it. Needs the LM demo
(``python -m kcm_core demo prepare lm``). Writes benchmarks/results/lm_speed.json and lm_speed.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kcm_core.demos import lm as demo_lm  # noqa: E402
from kcm_core.lm import split_blocks  # noqa: E402
from kcm_core.models import load_model  # noqa: E402
from kcm_core.pipeline import PruneConfig, prune  # noqa: E402
from common import goal_verdict, machine_line, ratio_interval, ratio_text, run_environment  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PREFILL = 128                 # prompt tokens
GOAL_BATCH, GOAL_GENERATION_SPEEDUP = 1, 1.15


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    model(input_ids=ids)
    return time.perf_counter() - start


@torch.no_grad()
def generate_tokens_per_second(model, ids: torch.Tensor, new_tokens: int) -> float:
    start = time.perf_counter()
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                   min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return ids.shape[0] * new_tokens / (time.perf_counter() - start)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=0.8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite lm_speed.md from lm_speed.json without timing anything")
    args = parser.parse_args()
    if args.render_only:
        data = json.loads((RESULTS / "lm_speed.json").read_text())
        (RESULTS / "lm_speed.md").write_text(markdown(data))
        print(markdown(data))
        return 0
    summary = demo_lm.stored_summary()
    if summary is None:
        print("the LM demo is not prepared: python -m kcm_core demo prepare lm", file=sys.stderr)
        return 2
    load_before = os.getloadavg()
    model, tokenizer = load_model(summary["model_dir"], device="cpu")
    calibration, evaluation = split_blocks(demo_lm.load_lm_split("calibration"), demo_lm.load_lm_split("evaluation"),
                                           tokenizer, 256, calibration_blocks=32, evaluation_blocks=2, batch_size=4)
    pruned = prune(model, PruneConfig(method="kcm", budget=args.budget, scale_samples=8), calibration).model
    pruned.eval()
    text = evaluation[0]["input_ids"]                                       # (B, 256) real text
    results = {}
    for batch in (1, 8):
        ids = text[:1, :PREFILL].repeat(batch, 1)
        for model_ in (model, pruned):                                          # warm-up
            prefill_seconds(model_, ids)
            generate_tokens_per_second(model_, ids, 4)
        rounds = []
        for _ in range(args.rounds):
            dense_pre, pruned_pre = prefill_seconds(model, ids), prefill_seconds(pruned, ids)
            dense_tps = generate_tokens_per_second(model, ids, args.new_tokens)
            pruned_tps = generate_tokens_per_second(pruned, ids, args.new_tokens)
            rounds.append({"dense_prefill_s": dense_pre, "pruned_prefill_s": pruned_pre,
                           "dense_tokens_per_s": dense_tps, "pruned_tokens_per_s": pruned_tps,
                           "prefill_speedup": dense_pre / pruned_pre, "generation_speedup": pruned_tps / dense_tps})
            print(f"batch {batch}: {rounds[-1]}", file=sys.stderr, flush=True)
        results[batch] = rounds
    data = {"settings": {"budget": args.budget, "rounds": args.rounds, "new_tokens": args.new_tokens,
                         "prefill_tokens": PREFILL, "command": " ".join(["python"] + sys.argv)},
            "rounds": results,
            "environment": run_environment(load_before)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lm_speed.json").write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "lm_speed.md").write_text(markdown(data))
    print(markdown(data))
    return 0


def summary(rounds: list[dict]) -> dict:
    """Medians of the raw timings, and each speedup as the median per-round ratio with its interval."""
    med = {k: statistics.median(r[k] for r in rounds) for k in
           ("dense_prefill_s", "pruned_prefill_s", "dense_tokens_per_s", "pruned_tokens_per_s")}
    return {**med,
            "prefill_speedup": ratio_interval([r["dense_prefill_s"] for r in rounds],
                                              [r["pruned_prefill_s"] for r in rounds]),
            "generation_speedup": ratio_interval([r["pruned_tokens_per_s"] for r in rounds],
                                                 [r["dense_tokens_per_s"] for r in rounds]),
            "prefill_range": [min(r["prefill_speedup"] for r in rounds), max(r["prefill_speedup"] for r in rounds)],
            "generation_range": [min(r["generation_speedup"] for r in rounds),
                                 max(r["generation_speedup"] for r in rounds)]}


def markdown(data: dict) -> str:
    s, env = data["settings"], data["environment"]
    lines = [f"# LM demo speed: KCM at {s['budget']} relative FLOPs against dense", "",
             f"Prefill of {s['prefill_tokens']} tokens; greedy generation of {s['new_tokens']} new tokens; "
             f"{s['rounds']} paired rounds (dense then pruned on the same input). Raw timings: median over "
             "rounds. Speedups: median of the per-round ratios [95% seeded bootstrap interval over rounds] "
             "(range over rounds).", "",
             "| batch | prefill dense / pruned (ms) | prefill speedup | generation dense / pruned (tokens/s) | generation speedup |",
             "|---|---|---|---|---|"]
    sums = {int(batch): summary(rounds) for batch, rounds in data["rounds"].items()}
    for batch, m in sums.items():
        (lo_p, hi_p), (lo_g, hi_g) = m["prefill_range"], m["generation_range"]
        lines.append(f"| {batch} | {m['dense_prefill_s'] * 1e3:.0f} / {m['pruned_prefill_s'] * 1e3:.0f} | "
                     f"{ratio_text(m['prefill_speedup'])} ({lo_p:.2f}-{hi_p:.2f}) | {m['dense_tokens_per_s']:.1f} / "
                     f"{m['pruned_tokens_per_s']:.1f} | {ratio_text(m['generation_speedup'])} ({lo_g:.2f}-{hi_g:.2f}) |")
    if GOAL_BATCH in sums:
        gen = sums[GOAL_BATCH]["generation_speedup"]
        lines += ["", f"Goal: at least {GOAL_GENERATION_SPEEDUP:.2f}x the tokens per second at batch {GOAL_BATCH}: "
                  f"**{goal_verdict(gen, GOAL_GENERATION_SPEEDUP)}** (median {ratio_text(gen)}; met only when "
                  "the interval's lower end clears the goal)."]
    lines += ["", machine_line(env), f"Command: `{env.get('command') or s['command']}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

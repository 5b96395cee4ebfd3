"""Is the pruned model actually faster? Dense vs physically pruned, PyTorch and ONNX Runtime, one process.

The subject is the demo model (MiniLM-L6 fine-tuned on movie-review polarity) when
``kcm_core.demos.classifier.demo_ready()``; otherwise a MiniLM-shaped ``BertForSequenceClassification`` (6 x 1536,
d = 384) with random weights built from a config, pruned on synthetic token sequences. The results
say which. KCM plans at relative FLOPs 0.9 ... 0.5 (counted at the unlabeled sample's average
length, as the paper does) come from ``kcm_core.pipeline.prune`` with scores computed once; with
``--multiples 1,64`` each budget is also rounded to widths that are multiples of 64.

Timing: ``torch.set_num_threads`` fixed, inputs of full length (no padding), warm-up runs, then
repeated rounds in which every model runs once in rotating order (so load drift on a shared machine
hits all models alike), median per model. Every round's time is kept: a speedup is the median of the
per-round ratios dense / pruned, with a seeded bootstrap interval over rounds (``common.ratio_interval``),
and the goal (at least 1.4x at 0.6, batch 32) is met only when that interval's lower end clears it. The ideal speedup is 1 / relative FLOPs of the paper's
count at the timed sequence length (attention matrix products included; embeddings, LayerNorm,
softmax, activations and the head are not in it, so measured speedups stay below it).
ONNX Runtime (CPUExecutionProvider, same thread count) times the exported dense and 0.6 models.

    python benchmarks/bench_speed.py [--quick] [--threads 2] [--repeats 15]
    python benchmarks/bench_speed.py --render-only [--quick]     # speed.md again from speed.json

Threads wait passively (``OMP_WAIT_POLICY=PASSIVE``, ONNX Runtime without spinning) unless the
environment says otherwise: on a 2-core machine shared with other processes, spinning OpenMP threads
wait for a preempted partner at every operator (measured here: MiniLM, batch 1, sequence 64, 2 threads:
540 ms spinning vs 26 ms passive). Run ``OMP_WAIT_POLICY=ACTIVE python benchmarks/bench_speed.py`` on an
idle machine to measure the default policy.

Writes benchmarks/results/speed.json and speed.md (``--quick``: speed-quick.*). Progress on stderr.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # read when torch loads OpenMP: before the import
import torch  # noqa: E402
import transformers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kcm_core  # noqa: E402
from kcm_core.arch import model_shape  # noqa: E402
from kcm_core.flops import relative_flops  # noqa: E402
from kcm_core.pipeline import PruneConfig, compute_scores, prune  # noqa: E402
from common import goal_verdict, machine_line, ratio_interval, ratio_text, run_environment  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BUDGETS = (0.9, 0.8, 0.7, 0.6, 0.5)
SHAPES = ((1, 64), (1, 128), (32, 64), (32, 128))       # (batch, sequence length)
ONNX_BUDGET = 0.6
GOAL_BUDGET, GOAL_BATCH, GOAL_SPEEDUP = 0.6, 32, 1.4


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def progress(msg: str, frac: float) -> None:
    if frac in (0.0, 1.0):
        log(f"    {msg}")


# --------------------------------------------------------------------------- the subject

def demo_subject(samples: int):
    from kcm_core.demos import classifier as demo
    from kcm_core.data import make_batches
    from kcm_core.models import load_model

    summary = demo.prepare_demo()                 # returns at once: demo_ready() was checked
    model, tokenizer = load_model(summary["model_dir"], device="cpu")
    train = demo.load_demo_split("train")
    sample = train.sample(samples, seed=0, shuffled=True)   # as drawn (its first 512 scale)
    batches = make_batches(sample, tokenizer, max_len=128, batch_size=64, with_labels=False)
    desc = (f"demo model: all-MiniLM-L6-v2 fine-tuned on sentence polarity ({summary['model_dir']}); "
            f"unlabeled sample: {len(sample)} demo train sentences")
    return model.eval(), batches, "demo", desc


def random_subject(samples: int):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                     num_attention_heads=12, intermediate_size=1536, num_labels=2)
    model = transformers.BertForSequenceClassification(config).eval()
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 41, (samples,), generator=gen)
    batches = []
    for start in range(0, samples, 64):
        lens = lengths[start:start + 64]
        ids = torch.randint(1000, config.vocab_size, (len(lens), int(lens.max())), generator=gen)
        mask = (torch.arange(ids.shape[1])[None, :] < lens[:, None]).long()   # (B, T)
        batches.append({"input_ids": ids * mask, "attention_mask": mask})
    desc = ("MiniLM-shaped BertForSequenceClassification (6 x 1536, d=384) with RANDOM weights built "
            "from a config, because the demo is not prepared (python -m kcm_core demo prepare); "
            f"unlabeled sample: {samples} synthetic sequences of 10-40 tokens")
    return model, batches, "random-minilm-shape", desc


# --------------------------------------------------------------------------- timing

def text_inputs(config, batch: int, seq: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(batch * 1000 + seq)
    ids = torch.randint(1000, config.vocab_size, (batch, seq), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}


def time_round_robin(runners: dict[str, callable], warmup: int, repeats: int) -> dict[str, dict]:
    """Median, min and spread of each runner's wall time; every round runs all of them, rotating."""
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            runners[name]()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)    # all threads of this process
    out = {}
    for name, ts in times.items():
        q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0]] * 3
        out[name] = {"median_ms": 1e3 * statistics.median(ts), "min_ms": 1e3 * min(ts),
                     "iqr_ms": [1e3 * q[0], 1e3 * q[2]], "cpu_median_ms": 1e3 * statistics.median(cpu[name]),
                     "runs": len(ts), "rounds_ms": [1e3 * t for t in ts],
                     "cpu_rounds_ms": [1e3 * t for t in cpu[name]]}
    return out


def speedups(base: dict, timed: dict, prefix: str = "") -> dict:
    """``base`` against ``timed`` over the same rounds: median per-round ratio with its interval, for
    wall time and process CPU time."""
    wall = ratio_interval(base["rounds_ms"], timed["rounds_ms"])
    cpu = ratio_interval(base["cpu_rounds_ms"], timed["cpu_rounds_ms"])
    return {f"{prefix}speedup": wall["median"], f"{prefix}speedup_ci95": wall["ci95"],
            f"cpu_{prefix}speedup": cpu["median"], f"cpu_{prefix}speedup_ci95": cpu["ci95"]}


def torch_runner(model, inputs):
    def run():
        with torch.inference_mode():
            model(**inputs)
    return run


def ort_runner(session, inputs):
    names = [i.name for i in session.get_inputs()]
    feeds = {k: v.numpy() for k, v in inputs.items() if k in names}

    def run():
        session.run(None, feeds)
    return run


# --------------------------------------------------------------------------- main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="budgets 0.8 and 0.6, 256 samples, few repeats")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 15; quick 4)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs per model (default 3; quick 1)")
    parser.add_argument("--multiples", default=None, help="width rounding variants, e.g. 1,64 (default 1,64; quick 1)")
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the .md from the results .json without timing anything")
    args = parser.parse_args()
    stem = "speed-quick" if args.quick else "speed"
    if args.render_only:
        data = json.loads((RESULTS / f"{stem}.json").read_text())
        (RESULTS / f"{stem}.md").write_text(markdown(data))
        log(f"rewrote {RESULTS / (stem + '.md')} from {stem}.json")
        return 0
    repeats = args.repeats or (4 if args.quick else 15)
    warmup = args.warmup or (1 if args.quick else 3)
    multiples = [int(m) for m in (args.multiples or ("1" if args.quick else "1,64")).split(",")]
    budgets = (0.8, 0.6) if args.quick else BUDGETS
    samples = 256 if args.quick else 2048
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = os.getloadavg()

    from kcm_core.demos import classifier as demo
    if demo.demo_ready():
        model, unlabeled, subject, description = demo_subject(samples)
    else:
        log("The demo is not prepared (python -m kcm_core demo prepare): timing a MiniLM-shaped model "
            "with random weights instead; the results say so.")
        model, unlabeled, subject, description = random_subject(samples)
    log(f"subject: {description}")
    shape = model_shape(model.config)

    log("scoring neurons with KCM (once for every budget)")
    base_config = PruneConfig(method="kcm", budget=0.6, scale_samples=min(512, samples))
    scores = compute_scores(model, base_config, unlabeled, progress=progress)
    variants = {"dense": {"model": model, "budget": 1.0, "multiple": 1, "kept": list(shape.ffn_width)}}
    seq_len = None
    for multiple in multiples:
        for budget in budgets:
            log(f"pruning to {budget} of FLOPs (widths multiple of {multiple})")
            result = prune(model, replace(base_config, budget=budget, multiple=multiple), unlabeled,
                           progress=progress, method_scores=scores)
            seq_len = result.seq_len
            name = f"kcm@{budget}" + (f"/x{multiple}" if multiple > 1 else "")
            variants[name] = {"model": result.model.eval(), "budget": budget, "multiple": multiple,
                              "kept": result.plan.kept_counts}

    rows = []
    for batch, seq in SHAPES:
        log(f"timing PyTorch: batch {batch}, sequence {seq} ({len(variants)} models, {repeats} rounds)")
        inputs = text_inputs(model.config, batch, seq)
        timing = time_round_robin({n: torch_runner(v["model"], inputs) for n, v in variants.items()},
                                  warmup, repeats)
        for name, v in variants.items():
            rel_avg = relative_flops(shape, seq_len, v["kept"])
            rel_here = relative_flops(shape, seq, v["kept"])
            rows.append({"model": name, "budget": v["budget"], "multiple": v["multiple"],
                         "batch": batch, "seq": seq, **timing[name],
                         "relative_flops_at_avg_len": rel_avg, "relative_flops_at_seq": rel_here,
                         **speedups(timing["dense"], timing[name]),
                         "ideal_speedup": 1.0 / rel_here, "kept_per_layer": v["kept"]})

    onnx_rows = onnx_timings(variants, model.config, warmup, repeats)

    import onnxruntime
    env = run_environment(load_before, onnxruntime=onnxruntime.__version__, threads=args.threads,
                          torch_threads=torch.get_num_threads(),
                          omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
    out = {"subject": subject, "description": description, "environment": env,
           "seq_len_avg": seq_len, "budgets": list(budgets), "multiples": multiples,
           "repeats": repeats, "warmup": warmup, "quick": args.quick,
           "kcm_scoring_seconds": scores.seconds, "pytorch": rows, "onnxruntime": onnx_rows,
           "wall_seconds": time.perf_counter() - started}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(out))
    log(f"wrote {RESULTS / (stem + '.json')} and {stem}.md in {out['wall_seconds']:.0f} s")
    return 0


def onnx_timings(variants: dict, config, warmup: int, repeats: int) -> list[dict]:
    """Export dense and the 0.6 model with save_pruned (verified), time ONNX Runtime beside PyTorch."""
    import onnxruntime as ort

    target = f"kcm@{ONNX_BUDGET}"
    if target not in variants:
        return []
    rows = []
    with tempfile.TemporaryDirectory(prefix="kcm-bench-") as tmp:
        sessions = {}
        for name in ("dense", target):
            log(f"exporting {name} to ONNX (verified in a fresh process)")
            result = kcm_core.save_pruned(variants[name]["model"], Path(tmp) / name.replace("@", "-"),
                                          formats=("onnx",), progress=progress)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = torch.get_num_threads()
            opts.inter_op_num_threads = 1
            if os.environ["OMP_WAIT_POLICY"].upper() == "PASSIVE":     # the same policy for ORT's pool
                opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sessions[name] = (ort.InferenceSession(str(result.out_dir / "model.onnx"), opts,
                                                   providers=["CPUExecutionProvider"]), result)
        for seq in (64, 128):
            log(f"timing ONNX Runtime vs PyTorch: batch 32, sequence {seq}")
            inputs = text_inputs(config, 32, seq)
            runners = {f"pytorch {n}": torch_runner(variants[n]["model"], inputs) for n in sessions}
            runners.update({f"onnxruntime {n}": ort_runner(s, inputs) for n, (s, _) in sessions.items()})
            timing = time_round_robin(runners, warmup, repeats)
            for name, t in timing.items():
                runtime, model_name = name.split(" ", 1)
                result = sessions[model_name][1]
                rows.append({"runtime": runtime, "model": model_name, "batch": 32, "seq": seq, **t,
                             **speedups(timing["pytorch dense"], t, prefix="vs_pytorch_dense_"),
                             "onnx_exporter": result.onnx_exporter,
                             "onnx_max_abs_diff": result.max_abs_diff.get("onnx")})
    return rows


def _ratio(row: dict, key: str) -> str:
    """A speedup with its interval over rounds; files written before rounds were kept have no interval."""
    old_key = {"vs_pytorch_dense_speedup": "speedup_vs_pytorch_dense",
               "cpu_vs_pytorch_dense_speedup": "cpu_speedup_vs_pytorch_dense"}.get(key, key)
    if f"{key}_ci95" in row:
        return ratio_text({"median": row[key], "ci95": row[f"{key}_ci95"]})
    value = row.get(key, row.get(old_key))
    return "n/a" if value is None else f"{value:.2f}x (no interval)"


def goal_line(data: dict) -> str:
    rows = [r for r in data["pytorch"] if r["budget"] == GOAL_BUDGET and r["batch"] == GOAL_BATCH
            and r["multiple"] == 1]
    if not rows:
        return f"Goal at {GOAL_BUDGET}, batch {GOAL_BATCH} (at least {GOAL_SPEEDUP}x): not measured in this run."
    parts = []
    for r in rows:
        if "speedup_ci95" in r:
            verdict = goal_verdict({"ci95": r["speedup_ci95"]}, GOAL_SPEEDUP)
            parts.append(f"seq {r['seq']}: {_ratio(r, 'speedup')}, **{verdict}**")
        else:
            parts.append(f"seq {r['seq']}: {r['speedup']:.2f}x, **not shown** (this file has no per-round "
                         "times, so no interval; rerun the benchmark)")
    return (f"Goal at {GOAL_BUDGET}, batch {GOAL_BATCH}: at least {GOAL_SPEEDUP}x, met only when the "
            "interval's lower end clears it. " + "; ".join(parts) + ".")


def markdown(data: dict) -> str:
    env = data["environment"]
    lines = [
        "# Speed: dense vs physically pruned (KCM)", "",
        f"Subject: {data['description']}.", "",
        machine_line(env) + f" OMP_WAIT_POLICY={env.get('omp_wait_policy')}. Each time is the median of "
        f"{data['repeats']} rounds after {data['warmup']} warm-up run(s) per model, models interleaved; each speedup is "
        "the median of the per-round ratios dense / pruned [95% seeded bootstrap interval over rounds].", "",
        f"Budgets are relative FLOPs of the paper's count (encoder MACs) at the unlabeled sample's average "
        f"length ({data['seq_len_avg']:.1f} tokens). Timed inputs are full-length sequences; the ideal "
        "speedup is 1 / relative FLOPs recomputed at the timed length (longer sequences spend more on "
        "attention, which FFN pruning does not touch).", "",
        "Wall time is what a user waits; CPU time (summed over this process's threads) is what the "
        "model costs and is less disturbed by other processes on a shared machine.", "",
        goal_line(data), "",
        "| model | batch | seq | median ms | IQR ms | speedup [95% CI] | CPU ms | CPU speedup [95% CI] | ideal (1/rel. FLOPs at seq) | rel. FLOPs at avg len | kept neurons |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["pytorch"]:
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['seq']} | {r['median_ms']:.1f} | "
            f"{r['iqr_ms'][0]:.1f}-{r['iqr_ms'][1]:.1f} | {_ratio(r, 'speedup')} | {r['cpu_median_ms']:.1f} | "
            f"{_ratio(r, 'cpu_speedup')} | {r['ideal_speedup']:.2f}x | "
            f"{r['relative_flops_at_avg_len']:.3f} | {sum(r['kept_per_layer'])} |")
    if data["onnxruntime"]:
        exporter = data["onnxruntime"][0]["onnx_exporter"]
        lines += ["", f"## ONNX Runtime (batch 32; {exporter} exporter; each export reloaded in a fresh "
                  "process and checked against PyTorch)", "",
                  "| runtime | model | seq | median ms | speedup vs PyTorch dense [95% CI] | CPU ms | CPU speedup [95% CI] | export max abs diff |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in data["onnxruntime"]:
            diff = f"{r['onnx_max_abs_diff']:.1e}" if r["runtime"] == "onnxruntime" else ""
            lines.append(f"| {r['runtime']} | {r['model']} | {r['seq']} | {r['median_ms']:.1f} | "
                         f"{_ratio(r, 'vs_pytorch_dense_speedup')} | {r['cpu_median_ms']:.1f} | "
                         f"{_ratio(r, 'cpu_vs_pytorch_dense_speedup')} | {diff} |")
    per_layer = {r["model"]: r["kept_per_layer"] for r in data["pytorch"] if r["batch"] == 1 and r["seq"] == 64}
    lines += ["", "Kept FFN neurons per layer:", ""]
    lines += [f"- {name}: {kept}" for name, kept in per_layer.items()]
    command = env.get("command") or f"python benchmarks/bench_speed.py{' --quick' if data['quick'] else ''}"
    lines += ["", f"Total wall time {data['wall_seconds']:.0f} s. Command: `{command}`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

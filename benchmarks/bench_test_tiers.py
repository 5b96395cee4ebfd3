"""How long the test tiers take: wall time, CPU time of the whole pytest process tree, tests per tier.

    python benchmarks/bench_test_tiers.py --label after            # runs the fast tier (plain pytest)
    python benchmarks/bench_test_tiers.py --label full --tier full  # runs everything (pytest -m "")
    python benchmarks/bench_test_tiers.py --label xdist --workers 2 # the fast tier on two pytest-xdist workers
    python benchmarks/bench_test_tiers.py --label before --from-logs TIME_V.txt PYTEST.txt LOAD0 LOAD1

CPU seconds are the children's user + system time (``resource.getrusage(RUSAGE_CHILDREN)``: pytest and
every process it waited for, fresh interpreters included). On a shared machine the wall time grows with
the other work; the CPU time much less, so it is the figure to compare. ``--from-logs`` records a run
measured by hand with ``/usr/bin/time -v`` (its user + system time is the same quantity).

Each run is merged by label into results/test_tiers.json; results/test_tiers.md is rendered from all.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from common import RESULTS, command_line, write_results

ROOT = Path(__file__).resolve().parents[1]
TIERS = {"fast": [], "full": ["-m", ""]}           # plain pytest leaves out `slow`; -m "" clears it
SUMMARY = re.compile(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)")


def counts(text: str) -> dict[str, int]:
    """pytest's last summary line as numbers: {"passed": 1227, "deselected": 14, ...}."""
    line = [ln for ln in text.splitlines() if SUMMARY.search(ln)][-1]
    return {kind: int(n) for n, kind in SUMMARY.findall(line)}


def collected(tier: str) -> int:
    """How many tests ``tier`` selects (``--collect-only``)."""
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           *TIERS[tier]], cwd=ROOT, capture_output=True, text=True)
    match = re.search(r"(\d+)(?:/\d+)? tests? collected", done.stdout)
    return int(match.group(1)) if match else -1


def run_tier(tier: str, workers: int = 0) -> dict:
    """One pytest run of ``tier``, timed (``workers`` > 0: spread over that many pytest-xdist workers,
    whose CPU time counts too: they are the pytest process's children)."""
    load_before = os.getloadavg()
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=30",
                           *TIERS[tier], *(["-n", str(workers)] if workers else [])], cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"tier": tier, "workers": workers, "wall_s": round(wall, 1),
            "cpu_s": round(after.ru_utime - usage.ru_utime + after.ru_stime - usage.ru_stime, 1),
            "exit_code": done.returncode, "summary": counts(done.stdout),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "durations": durations(done.stdout), "command": command_line()}


def durations(text: str, top: int = 10) -> list[str]:
    lines = text.split("slowest 30 durations", 1)[-1].splitlines()
    return [ln.strip() for ln in lines if re.match(r"\s*\d+\.\d+s ", ln)][:top]


def from_logs(time_v: Path, log: Path, load_before: str, load_after: str) -> dict:
    """A run measured by hand: ``/usr/bin/time -v python3 -m pytest ...`` and pytest's own output."""
    text = time_v.read_text()
    field = lambda name: re.search(rf"{name}: (.+)", text).group(1).strip()           # noqa: E731
    h_m_s = [float(x) for x in field(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\)").split(":")]
    wall = sum(x * 60 ** i for i, x in enumerate(reversed(h_m_s)))
    loads = lambda s: [float(x) for x in s.split()[:3]]                               # noqa: E731
    return {"tier": "fast", "wall_s": round(wall, 1),
            "cpu_s": round(float(field(r"User time \(seconds\)")) + float(field(r"System time \(seconds\)")), 1),
            "exit_code": int(field("Exit status")), "summary": counts(log.read_text()),
            "load_average_before": loads(load_before), "load_average_after": loads(load_after),
            "durations": durations(log.read_text()),
            "command": "/usr/bin/time -v python3 -m pytest --durations=60 -q -p no:cacheprovider"}


def render(runs: dict) -> str:
    rows = ["| Run | Tier | Commit | Tests run | Wall | CPU (process tree) | Load before (1, 5, 15 min) | "
            "Load after |", "|---|---|---|---|---|---|---|---|"]
    for label, run in runs.items():
        summary = ", ".join(f"{n} {k}" for k, n in run["summary"].items())
        tier = run["tier"] + (f", {run['workers']} workers" if run.get("workers") else "")
        rows.append(f"| {label} | {tier} | {run.get('commit', '?')} | {summary} | "
                    f"{run['wall_s'] / 60:.1f} min | {run['cpu_s']:.0f} s ({run['cpu_s'] / 60:.1f} min) | "
                    f"{' / '.join(f'{x:.2f}' for x in run['load_average_before'])} | "
                    f"{' / '.join(f'{x:.2f}' for x in run['load_average_after'])} |")
    notes = [f"- {label}: `{run['command']}`" + (f"; collected: {run['collected']}" if run.get("collected") else "")
             for label, run in runs.items()]
    slowest = [f"\n### Slowest in {label}\n\n" + "\n".join(f"    {d}" for d in run["durations"])
               for label, run in runs.items() if run.get("durations")]
    return ("# Test tiers: time per tier\n\nWritten by `benchmarks/bench_test_tiers.py`. The machine has two cores "
            "shared with other work (see the load columns): wall times grow with that load, the CPU time of the "
            "pytest process tree much less, so compare CPU time. The fast tier's goal is under 5 minutes on "
            "two cores.\n\n" + "\n".join(rows) + "\n\n" + "\n".join(notes) + "\n" + "\n".join(slowest) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--label", required=True)
    parser.add_argument("--tier", choices=list(TIERS), default="fast")
    parser.add_argument("--from-logs", nargs=4, metavar=("TIME_V", "PYTEST_LOG", "LOAD_BEFORE", "LOAD_AFTER"))
    parser.add_argument("--commit", default=None, help="the commit measured (default: HEAD)")
    parser.add_argument("--workers", type=int, default=0, help="pytest-xdist workers (default: none, one process)")
    parser.add_argument("--count", action="store_true", help="also count the tests each tier selects")
    args = parser.parse_args()
    path = RESULTS / "test_tiers.json"
    runs = json.loads(path.read_text()) if path.exists() else {}
    if args.from_logs:
        time_v, log, before, after = args.from_logs
        run = from_logs(Path(time_v), Path(log), before, after)
    else:
        run = run_tier(args.tier, args.workers)
    run["commit"] = args.commit or subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                  capture_output=True, text=True).stdout.strip()
    if args.count:
        run["collected"] = {tier: collected(tier) for tier in TIERS}
    runs[args.label] = run
    print(write_results("test_tiers", runs, render(runs)))


if __name__ == "__main__":
    main()

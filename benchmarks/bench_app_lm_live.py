"""What a slider move waits for on the real LM demo, before and after the Prune page's job took over the
timing and the generation (issue 22, 6), measured the way the page computes them (``kcm_app.engine`` and
the page's own ``view_job`` on a ``kcm_app.live.LatestOnly`` runner).

    python benchmarks/bench_app_lm_live.py [--method wanda-sp] [--repair none]

1. A budget computed uninterrupted: the evaluation, then the timing and the generation panel's two
   continuations. Before the change the page's run did the timing and the generation itself, so a
   slider move made meanwhile waited for them (their sum, at most).
2. The page's job for another budget, abandoned while it times (budget 0.85) and while it generates
   (0.80), the way a budget moved back to abandons it (``keep_only``): the seconds from the abandon to
   the job's end, and whether it stored anything of the abandoned stage (it must not).

The method does not matter for these two measures (timing and generation read only the plan); the
default is Wanda-sp without repair, whose budget is quick. The app's disk cache goes to a temporary
folder (the user's is untouched). Writes benchmarks/results/app_lm_live.json and .md. Needs the LM demo
(``python -m kcm_core demo prepare lm``).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import machine_line, run_environment, on_lm_demo, timed, write_results  # noqa: E402


def abandoned_in(stage: str, ws, config, store, prompt: str, timeout: float = 1800) -> dict:
    """Run the page's job for ``config`` until it is inside ``stage`` (one step done there), abandon it as
    a stored view would, and time how long it takes to stop."""
    from kcm_app import engine, live
    from kcm_app.views import prune
    runner = live.LatestOnly("bench")
    job = runner.submit(prune.view_key(ws, config, prompt), prune.view_job(ws, config, store, prompt))
    step = {"timing": "timing: pass", "generation": "generation: unpruned: new token"}[stage]
    deadline = time.monotonic() + timeout
    while not job.message.startswith(step) and not job.done and time.monotonic() < deadline:
        time.sleep(0.02)
    if job.done:
        raise RuntimeError(f"the job ended before its {stage} ({job.error!r})")
    at_abandon = job.message
    start = time.perf_counter()
    runner.keep_only("a stored view")
    job.wait()
    stop_s = time.perf_counter() - start
    return {"budget": config.budget, "message_at_abandon": at_abandon, "stop_s": stop_s,
            "abandoned": isinstance(job.error, live.Abandoned), "job_s": job.seconds,
            "evaluated": engine.is_evaluated(ws, config, store), "timed": engine.is_timed(ws, config, store),
            "generated": engine.is_generated(ws, config, prompt, store)}


def measure(method: str, repair: str, cache: Path) -> dict:
    from kcm_app import disk_cache, engine, resources
    disk_cache.root = lambda: cache / "v1"          # this run's own disk cache
    from kcm_app.sources import LM_CALIBRATION_BLOCKS, DataChoice, ModelChoice, SampleChoice
    from kcm_app.store import SharedStore
    from kcm_core.pipeline import PruneConfig
    from kcm_core.repair import RepairConfig
    import torch

    ws, load_s = timed(lambda: resources.workspace(ModelChoice("demo-lm"), DataChoice("demo-lm"),
                                                   SampleChoice(LM_CALIBRATION_BLOCKS, 256, 0)))
    store = SharedStore(max_entries=64)
    prompt = engine.DEFAULT_PROMPT
    base = PruneConfig(method=method, budget=0.9, repair=RepairConfig(repair), scale_samples=engine.scale_samples(ws),
                       seed=0)
    _, evaluate_s = timed(lambda: engine.evaluate_budget(ws, base, store))
    speed, speed_s = timed(lambda: engine.measure_speed(ws, base, store))
    text, generate_s = timed(lambda: engine.continuations(ws, base, prompt, store))
    return {"workspace_s": load_s, "threads": torch.get_num_threads(), "method": method, "repair": repair,
            "uninterrupted": {"budget": base.budget, "evaluate_s": evaluate_s, "timing_s": speed_s,
                              "generation_s": generate_s, "measured_speedup": speed.measured_speedup,
                              "timed_on": speed.timed_on, "tokens_per_s": [text.dense_tokens_per_s,
                                                                           text.pruned_tokens_per_s]},
            "abandoned": [abandoned_in("timing", ws, replace(base, budget=0.85), store, prompt),
                          abandoned_in("generation", ws, replace(base, budget=0.8), store, prompt)]}


def markdown(data: dict) -> str:
    r, env = data["result"], data["environment"]
    u = r["uninterrupted"]
    lines = ["# What a slider move waits for on the LM demo (the Prune page's job)", "",
             f"SmolLM2-135M, method `{r['method']}`, repair `{r['repair']}`, the app's blocks; "
             f"{r['threads']} torch threads. Workspace load {r['workspace_s']:.1f} s.", "",
             f"Uninterrupted, at {u['budget']:.2f}: evaluation {u['evaluate_s']:.1f} s, timing "
             f"{u['timing_s']:.1f} s ({u['timed_on']}; measured speedup {u['measured_speedup']:.2f}x), "
             f"generation panel {u['generation_s']:.1f} s. Before the change the page's run did the timing "
             f"and the generation itself: a slider move made meanwhile waited up to "
             f"{u['timing_s'] + u['generation_s']:.1f} s, and a budget moved back to left the job running.", "",
             "| abandoned while | budget | last step before the abandon | stopped after (s) | stored of that stage |",
             "|---|---|---|---|---|"]
    for a, stage, part in zip(r["abandoned"], ("timing", "generating"), ("timed", "generated")):
        lines.append(f"| {stage} | {a['budget']:.2f} | {a['message_at_abandon']} | {a['stop_s']:.2f} | "
                     f"{'yes (a defect)' if a[part] else 'nothing'} |")
    lines += ["", "A page showing a stored budget does not wait for the abandoned job at all (it is drawn "
              "from the store); the column above is how long the abandoned job kept the cores.", "",
              machine_line(env), f"Command: `{env.get('command')}`.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="wanda-sp")
    parser.add_argument("--repair", default="none")
    args = parser.parse_args()
    measured = on_lm_demo(lambda cache: measure(args.method, args.repair, cache))
    if measured is None:
        return 2
    result, load_before = measured
    data = {"settings": vars(args), "result": result, "environment": run_environment(load_before)}
    print(write_results("app_lm_live", data, markdown(data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

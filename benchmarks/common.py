"""What every benchmark writes beside its numbers, and how its speed ratios are summarised.

- ``run_environment``: the machine (CPU model, logical CPUs, threads), library versions, the exact
  command, and the load average before and after the run, with a verdict that says "idle" only when
  the load before the run says so (the load after includes the benchmark's own threads).
- ``ratio_interval``: a speedup measured in paired rounds (dense and pruned timed in the same round)
  as the median of the per-round ratios with a seeded percentile-bootstrap interval over rounds, so a
  noisy shared machine widens the interval instead of moving a single number.
- ``goal_verdict``: a speed goal is "met" only when the interval's lower end clears it.

Imported by the scripts in this folder (``sys.path[0]`` is this folder when one runs) and by
``render_readme.py``.
"""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

# Below this 1-minute load average before the run, the machine counts as idle: less than half a core
# was busy with other work when the benchmark started.
IDLE_LOAD = 0.5
RESAMPLES = 2000


RESULTS = Path(__file__).resolve().parent / "results"


def write_results(stem: str, data: Mapping[str, Any], markdown: str, indent: int = 2) -> str:
    """``results/<stem>.json`` and ``.md`` written together; returns the Markdown (to print it)."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=indent) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown)
    return markdown


def rerender(stem: str, pair: Callable[[dict], None], markdown: Callable[[dict], str]) -> int:
    """``--render-only``: ``results/<stem>.json`` paired again (``pair``) and both files rewritten, nothing
    measured; prints the Markdown."""
    data = json.loads((RESULTS / f"{stem}.json").read_text())
    pair(data)
    print(write_results(stem, data, markdown(data)))
    return 0


def merge_budgets(data: dict, path: Path) -> None:
    """``--merge``: ``data`` keeps the rows ``path`` holds for budgets this run did not measure, and says
    both commands and both wall times."""
    if not path.exists():
        return
    old = json.loads(path.read_text())
    ran = {r["budget"] for r in data["rows"]}
    data["rows"] = [r for r in old["rows"] if r["budget"] not in ran] + data["rows"]
    data["settings"]["command"] = old["settings"]["command"] + "; " + data["settings"]["command"]
    data["wall_seconds"] += old["wall_seconds"]


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command that produced a results file, as one would type it again."""
    argv = sys.argv if argv is None else argv
    policy = os.environ.get("OMP_WAIT_POLICY")
    prefix = f"OMP_WAIT_POLICY={policy} " if policy else ""
    return prefix + "python " + " ".join(shlex.quote(a) for a in argv)


def run_environment(load_before: Sequence[float], **extra: Any) -> dict[str, Any]:
    """``kcm_core.report.Environment`` plus the load before (given) and after (now), the command and
    whether the machine was idle; ``extra`` adds script-specific entries (e.g. onnxruntime)."""
    from kcm_core.report import Environment
    env = {**asdict(Environment.here()), **extra,
           "load_average_before": [float(x) for x in load_before],
           "load_average_after": [float(x) for x in os.getloadavg()],
           "command": command_line()}
    env["machine_state"] = machine_state(env)
    return env


def machine_state(env: Mapping[str, Any]) -> str:
    """"idle" or "shared (load X before, Y after)": from the recorded loads, never assumed. The run
    itself keeps about ``threads`` cores busy, so a one-minute load after it above that (plus
    ``IDLE_LOAD``) means other work shared the cores during the run, whatever the load before."""
    before, after = env.get("load_average_before"), env.get("load_average_after")
    if not before:
        return "unknown (no load recorded)"
    after_text = f", {after[0]:.1f} after" if after else ""
    own = float(env.get("threads") or 0)
    if before[0] < IDLE_LOAD and not (after and own and after[0] > own + IDLE_LOAD):
        return f"idle (load {before[0]:.1f} before{after_text})"
    return f"shared (load {before[0]:.1f} before{after_text}; other work used the cores)"


def machine_line(env: Mapping[str, Any]) -> str:
    """One Markdown sentence: CPU, threads, versions, load and the idle verdict."""
    cpus = f" ({env['logical_cpus']} logical CPUs)" if env.get("logical_cpus") else ""
    extra = f", onnxruntime {env['onnxruntime']}" if env.get("onnxruntime") else ""
    return (f"Machine: {env.get('cpu', 'unknown CPU')}{cpus}, {env.get('threads')} threads, torch "
            f"{env.get('torch')}, transformers {env.get('transformers')}{extra}, Python {env.get('python')}; "
            f"{env.get('machine_state') or machine_state(env)}.")


def ratio_interval(numerators: Sequence[float], denominators: Sequence[float], seed: int = 0,
                   resamples: int = RESAMPLES) -> dict[str, Any]:
    """Median of ``numerators[i] / denominators[i]`` over paired rounds, with a 95% percentile
    bootstrap interval over rounds (``scipy.stats.bootstrap``, seeded). One round has no interval:
    both ends are its ratio."""
    from scipy import stats
    num, den = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    if num.shape != den.shape or num.size == 0:
        raise ValueError(f"need the same number of paired rounds on both sides, got {num.size} and {den.size}")
    ratios = num / den
    median = float(np.median(ratios))
    if ratios.size == 1:
        return {"median": median, "ci95": [median, median], "rounds": 1}
    result = stats.bootstrap((ratios,), np.median, n_resamples=resamples, method="percentile",
                             rng=np.random.default_rng(seed))
    ci = result.confidence_interval
    return {"median": median, "ci95": [float(ci.low), float(ci.high)], "rounds": int(ratios.size)}


def goal_verdict(interval: Mapping[str, Any], goal: float) -> str:
    """"met" when the lower end of the interval reaches ``goal``, "not met" when the upper end stays
    below it, otherwise "not shown" (the interval holds the goal: more or quieter rounds decide)."""
    low, high = interval["ci95"]
    if low >= goal:
        return "met"
    if high < goal:
        return "not met"
    return "not shown"


def ratio_text(interval: Mapping[str, Any]) -> str:
    low, high = interval["ci95"]
    return f"{interval['median']:.2f}x [{low:.2f}, {high:.2f}]"


def perplexity_cell(row: Mapping[str, Any] | None) -> str:
    """A method's perplexity, then its ratio to KCM's on the same blocks [paired interval] and the
    bootstrap p where the row has one (``kcm_core.lm.paired_perplexity``)."""
    from kcm_core.lm import bootstrap_p_text
    if row is None:
        return ""
    text = f"{row['perplexity']['value']:,.1f}"
    vs = row.get("vs_kcm")
    if vs:
        lo, hi = vs["ci95"]
        p = f", p {bootstrap_p_text(vs['p_value'])}" if vs.get("p_value") is not None else ""
        text += f" (x{vs['ratio']:.2f} [{lo:.2f}, {hi:.2f}]{p})"
    return text


def cell_config(cell: str, **fields: Any):
    """A grid cell as a ``PruneConfig``: a method name alone (its own recipe), or
    ``score/allocation/repair/target`` (the method whose score picks the neurons, how the budget is
    spread over layers, the repair step and what it fits to). ``fields`` are the other config fields."""
    from kcm_core.config import PruneConfig
    from kcm_core.repair import RepairConfig
    parts = cell.split("/")
    if len(parts) == 1:
        return PruneConfig(method=cell, **fields)
    if len(parts) != 4:
        raise ValueError(f"a cell is a method name or score/allocation/repair/target, got {cell!r}")
    score, allocation, repair, target = parts
    return PruneConfig(method=score, allocation=allocation, repair=RepairConfig(repair, target), **fields)


def cell_method(cell: str) -> str:
    """The method (score) name of a cell."""
    return cell.split("/")[0]


def cell_label(cell: str) -> str:
    """A cell in words: the method's label, or its score's label with the allocation and repair."""
    from kcm_core.methods import METHODS
    if "/" not in cell:
        return METHODS[cell].label
    score, allocation, repair, target = cell.split("/")
    return f"{METHODS[score].label} score, {allocation}, {repair} ({target})"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """``fn()`` and the seconds it took."""
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def on_lm_demo(measure: Callable[[Path], Any]) -> tuple[Any, Sequence[float]] | None:
    """``measure(cache)`` on the prepared LM demo, with a temporary app cache folder of its own, and the
    load average before it; None (said on stderr) when the LM demo is not prepared."""
    import tempfile
    from kcm_core.demos import lm as demo_lm
    if demo_lm.stored_summary() is None:
        print("the LM demo is not prepared: python -m kcm_core demo prepare lm", file=sys.stderr)
        return None
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="kcm-app-cache-") as tmp:
        return measure(Path(tmp)), load_before

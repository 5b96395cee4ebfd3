"""R2 that scales with N: which stopping rule, measured against the exact iteration.

The "exact" R2 is the library's default: the multiplicative update from the uniform start until the
absolute rule's change is at most alpha = 0.01. Every other option (the closed form, the printed
signed rule, the ranking rules, a fixed cap of 10 iterations) is compared with it in four parts:

- ``agreement``: per layer of the real demo weights (classifier: MiniLM-L6, 6 x 1536 down-projection
  rows; LM: SmolLM2-135M, 30 x 1536 down columns), the Spearman correlation and the top-40% overlap
  of the option's R2 with the exact R2, its iterations and its wall time.
- ``downstream``: KCM (R2 x D2, scaled) with each option's R2 and the same D2 statistics: accuracy on
  the classifier demo's 800 test sentences, paired against the exact R2 (difference with a paired
  bootstrap interval, McNemar's exact test), and perplexity on held-out blocks of the LM demo, paired
  against the exact R2 over the same blocks (ratio with a block-bootstrap interval and its p,
  ``kcm_core.lm.paired_perplexity``, as in ``bench_lm.py``); plus the share of the kept neurons both
  choose. The LM takes several budgets at once (``--lm-budget 0.8,0.9``; the fits are shared). Run
  without the ``agreement`` part, it fits only the options it evaluates and leaves the stored
  agreement table as it was.
- ``timing``: random weights in a BERT-base shape (12 x 3072, hidden 768) and a Qwen2-0.5B shape
  (24 x 4864, hidden 896). The closed form runs on every layer. Random rows are nearly equidistant,
  so the exact rule would stop early on them: the iteration is timed on one layer with a fixed number
  of iterations, and whole-model figures for the iterating rules are **extrapolated** from it with the
  iteration counts measured on the demos' real weights (the larger of the two demos' means per
  layer; labelled as such).
- ``memory``: peak resident memory of one fit at N = 11008, d = 4096 (LLaMA-7B's MLP shape, random
  weights), iterating and in closed form, in a fresh process each, against
  ``kcm_core.hull.hull_memory_bytes``. The iterating fit is timed with 1 and then 2 iterations (one
  iteration's time is the difference), and a whole exact fit is **extrapolated** from them with the
  demos' iteration counts (labelled as such).

    python benchmarks/bench_r2_scale.py [--parts agreement,downstream,timing,memory] [--eval-blocks 8]
    python benchmarks/bench_r2_scale.py --parts downstream --demos lm --lm-budget 0.8,0.9 \
        --options 'closed_form,spearman 1e-4' --eval-blocks 8
    python benchmarks/bench_r2_scale.py --render-only      # r2_scale.md again from r2_scale.json

Parts can be run separately; each run updates its parts in benchmarks/results/r2_scale.json and
rewrites r2_scale.md from the whole file. The load average before and after each part is recorded:
on a shared machine absolute times are pessimistic, ratios within one part are the honest figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from kcm_core.activations import collect_stats  # noqa: E402
from kcm_core.arch import ffn_blocks  # noqa: E402
from kcm_core.hull import HullConfig, hull_memory_bytes, kernel_hull, spearman, top_overlap  # noqa: E402
from kcm_core.kernel import gaussian_kernel, median_distance  # noqa: E402
from kcm_core.methods import method, score_with  # noqa: E402
from kcm_core.report import Environment  # noqa: E402
from common import run_environment  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
EXACT = "absolute"
OPTIONS: dict[str, HullConfig] = {
    EXACT: HullConfig(),
    "closed_form": HullConfig(stop_rule="closed_form"),
    "signed": HullConfig(stop_rule="signed"),
    "spearman 1e-4": HullConfig(stop_rule="spearman", rank_tol=1e-4),
    "spearman 1e-6": HullConfig(stop_rule="spearman", rank_tol=1e-6),
    "topk 40%": HullConfig(stop_rule="topk", rank_tol=1e-4, top_share=0.4),
    "10 iterations": HullConfig(max_iter=10, alpha=1e-9),
}
SHAPES = {"BERT-base": (12, 3072, 768), "Qwen2-0.5B": (24, 4864, 896)}
GOALS = {"BERT-base": 60.0, "Qwen2-0.5B": 300.0}
TIMED_ITERATIONS = 3
TOP_SHARE = 0.4


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def environment() -> dict:
    return {**asdict(Environment.here()), "load_average": list(os.getloadavg())}


class FixedSources:
    """``kcm_core.methods.ScoreSources`` over components computed once here: one option's R2 fits
    and the activation statistics every option shares."""

    def __init__(self, model, config, fits, stats):
        self.model, self.config, self._fits, self._stats = model, config, fits, stats

    def r2(self):
        return [f.scores for f in self._fits], self._fits

    def stats(self):
        return self._stats

    def grads(self):
        raise ValueError("KCM uses no gradients")


# --------------------------------------------------------------------------- the demos

def load_classifier():
    from kcm_core.demos import classifier as demo
    from kcm_core.data import make_batches
    from kcm_core.models import load_model
    if not demo.demo_ready():
        sys.exit("the demo is not prepared: run `python -m kcm_core demo prepare` first")
    model, tokenizer = load_model(str(demo.prepare_demo()["model_dir"]), device="cpu")
    train = demo.load_demo_split("train")
    train = train.subset(list(range(min(2048, len(train)))))
    unlabeled = make_batches(train, tokenizer, max_len=64, batch_size=64, with_labels=False)
    test = make_batches(demo.load_demo_split("test"), tokenizer, max_len=64, batch_size=64)
    return model, unlabeled, test


# The classifiers the downstream part can run on: the demo and the quality benchmark's real tasks
# (``python benchmarks/prepare_tasks.py``), each a MiniLM-L6 fine-tuned on it.
CLASSIFIERS = {"classifier": "Classifier demo (MiniLM-L6, 6 x 1536)",
               "hedge": "CoNLL-2010 hedge task (MiniLM-L6 fine-tuned, 6 x 1536)",
               "fine-foods": "Amazon Fine Food task (MiniLM-L6 fine-tuned, 6 x 1536)"}
TITLES = {**CLASSIFIERS, "lm": "LM demo (SmolLM2-135M, 30 x 1536)"}


def load_task(name: str):
    """A prepared real task's fine-tuned model, up to 2048 training texts (unlabeled) and its test split."""
    from bench_quality import load_task as task_files
    from kcm_core.data import make_batches
    from kcm_core.models import load_model
    try:
        task = task_files(name)
    except ValueError as err:
        sys.exit(str(err))
    model, tokenizer = load_model(str(task["model_dir"]), device="cpu")
    train = task["train"].subset(list(range(min(2048, len(task["train"])))))
    unlabeled = make_batches(train, tokenizer, max_len=task["max_len"], batch_size=64, with_labels=False)
    test = make_batches(task["test"], tokenizer, max_len=task["max_len"], batch_size=64)
    return model, unlabeled, test


def load_lm(eval_blocks: int):
    from kcm_core.demos import lm as demo_lm
    from kcm_core.lm import split_blocks
    from kcm_core.models import load_model
    summary = demo_lm.stored_summary()
    if summary is None:
        sys.exit("the LM demo is not prepared: run `python -m kcm_core demo prepare lm` first")
    model, tokenizer = load_model(summary["model_dir"], device="cpu")
    calibration, evaluation = split_blocks(demo_lm.load_lm_split("calibration"),
                                           demo_lm.load_lm_split("evaluation"), tokenizer, 256,
                                           calibration_blocks=32, evaluation_blocks=eval_blocks,
                                           batch_size=4)
    return model, calibration, evaluation


def fit_all(model, options: dict[str, HullConfig]) -> dict[str, dict]:
    """Every option's fit of every layer, with its wall time."""
    points = [b.down_rows().detach().float() for b in ffn_blocks(model)]
    out = {}
    for name, config in options.items():
        fits, seconds = [], []
        for p in points:
            start = time.perf_counter()
            fits.append(kernel_hull(p, config, device="cpu"))
            seconds.append(time.perf_counter() - start)
        out[name] = {"fits": fits, "seconds": seconds}
        log(f"  {name}: iterations {[f.iterations for f in fits]}, {sum(seconds):.1f} s")
    return out


def agreement_rows(fitted: dict[str, dict]) -> list[dict]:
    exact = fitted[EXACT]["fits"]
    rows = []
    for name, got in fitted.items():
        rho = [spearman(f.scores, e.scores) for f, e in zip(got["fits"], exact)]
        top = [top_overlap(e.scores, f.scores, TOP_SHARE) for f, e in zip(got["fits"], exact)]
        rows.append({"option": name, "config": asdict(OPTIONS[name]),
                     "iterations": [f.iterations for f in got["fits"]],
                     "converged": all(f.converged for f in got["fits"]),
                     "spearman": rho, "top40_overlap": top, "seconds": got["seconds"],
                     "seconds_total": sum(got["seconds"]),
                     "time_vs_exact": sum(got["seconds"]) / sum(fitted[EXACT]["seconds"])})
    return rows


def part_agreement_and_downstream(parts: set[str], demos: list[str], options: list[str],
                                  downstream_options: list[str], eval_blocks: int, budget_cls: float,
                                  budgets_lm: list[float]) -> dict:
    from kcm_core.evaluate import evaluate_classifier
    from kcm_core.lm import evaluate_lm
    chosen = {name: OPTIONS[name] for name in [EXACT] + [o for o in options if o != EXACT]}
    if "agreement" not in parts:           # downstream alone: fit only what is evaluated
        chosen = {name: c for name, c in chosen.items() if name == EXACT or name in downstream_options}
    out = {}
    for demo_name in demos:
        before = environment()
        load_before = os.getloadavg()
        log(f"{demo_name}: loading")
        if demo_name == "classifier":
            model, unlabeled, test = load_classifier()
        elif demo_name in CLASSIFIERS:
            model, unlabeled, test = load_task(demo_name)
        else:
            model, unlabeled, test = load_lm(eval_blocks)
        fitted = fit_all(model, chosen)
        result = {}
        if "agreement" in parts:
            result["agreement"] = agreement_rows(fitted)
            result["environment_before"], result["environment_after"] = before, environment()
        if "downstream" in parts:
            budgets = [budget_cls] if demo_name in CLASSIFIERS else budgets_lm
            shared = Shared(collect_stats(model, unlabeled),
                            evaluate_classifier(model, test) if demo_name in CLASSIFIERS
                            else evaluate_lm(model, test))
            fits = {name: {"iterations": [f.iterations for f in got["fits"]],
                           "seconds_total": sum(got["seconds"])} for name, got in fitted.items()}
            runs = []
            for budget in budgets:
                runs.append(downstream_at(demo_name, model, unlabeled, test, fitted, chosen,
                                          downstream_options, budget, eval_blocks, shared))
                if demo_name in CLASSIFIERS:
                    result["downstream"] = {**runs[0], "environment": run_environment(load_before)}
                else:   # several budgets, with the fits they share and the machine's load over the part
                    result["downstream_runs"] = {"runs": runs, "fits": fits,
                                                 "environment": run_environment(load_before)}
                    save({"demos": {demo_name: result}})     # each budget as soon as it is done
        out[demo_name] = result
        save({"demos": {demo_name: result}})                 # each demo as soon as it is done
    return out


@dataclass(frozen=True)
class Shared:
    """What every option and budget of one demo shares: the activation statistics behind D2 and the
    unpruned model's evaluation."""
    stats: object
    dense: object


def downstream_at(demo_name: str, model, unlabeled, test, fitted: dict, chosen: dict,
                  downstream_options: list[str], budget: float, eval_blocks: int, shared: Shared) -> dict:
    """KCM at one budget with each option's R2 (same D2 statistics), each paired against the exact R2."""
    from kcm_core.evaluate import evaluate_classifier, labels_of, paired_difference
    from kcm_core.lm import evaluate_lm, paired_perplexity
    from kcm_core.pipeline import PruneConfig, prune
    stats, dense = shared.stats, shared.dense
    scale_samples = 512 if demo_name in CLASSIFIERS else 8
    rows, plans, evals = [], {}, {}
    for name, got in fitted.items():
        if name != EXACT and name not in downstream_options:
            continue
        config = PruneConfig(method="kcm", budget=budget, hull=chosen[name], scale_samples=scale_samples)
        scores = score_with(method("kcm"), FixedSources(model, config, got["fits"], stats))
        start = time.perf_counter()
        pruned = prune(model, config, unlabeled, method_scores=scores)
        plans[name] = [set(layer.keep_idx) for layer in pruned.plan.layers]
        if demo_name in CLASSIFIERS:
            ev = evaluate_classifier(pruned.model, test, reference=dense.predictions)
            evals[name] = (ev.predictions == labels_of(test)).numpy()
            row = {"option": name, "accuracy": ev.accuracy.to_dict(), "agreement": ev.agreement.to_dict()}
        else:
            ev = evaluate_lm(pruned.model, test)
            evals[name] = ev.stats
            row = {"option": name, "perplexity": ev.perplexity.to_dict(),
                   "block_nll": ev.stats.nll.tolist(), "block_tokens": ev.stats.tokens.tolist(),
                   "kept": pruned.plan.total_kept}
        row["seconds_prune_and_evaluate"] = time.perf_counter() - start
        log(f"  {name} @ {budget}: {({k: v for k, v in row.items() if not k.startswith('block_')})}")
        rows.append(row)
    for row in rows:
        same = sum(len(a & b) for a, b in zip(plans[row["option"]], plans[EXACT]))
        row["kept_overlap_with_exact"] = same / sum(len(b) for b in plans[EXACT])
        if demo_name in CLASSIFIERS:
            row["vs_exact"] = paired_difference(evals[row["option"]], evals[EXACT]).to_dict()
        else:
            row["vs_exact"] = paired_perplexity(evals[row["option"]], evals[EXACT]).to_dict()
            row["vs_unpruned"] = paired_perplexity(evals[row["option"]], dense.stats).to_dict()
    run = {"budget": budget, "rows": rows,
           "evaluated_on": (f"{len(labels_of(test))} test texts" if demo_name in CLASSIFIERS
                            else f"{eval_blocks} held-out blocks of 256 tokens")}
    if demo_name in CLASSIFIERS:
        run["unpruned_accuracy"] = dense.accuracy.to_dict()
    else:
        run["unpruned_perplexity"] = dense.perplexity.to_dict()
    return run


# --------------------------------------------------------------------------- timing and memory

def random_rows(n: int, d: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen) * 0.02                 # (N, d), an init-scale layer


def part_timing() -> dict:
    """Measured: the closed form on every layer, and one layer's kernel setup and iteration time."""
    out = {"environment_before": environment(), "shapes": {}}
    for shape_name, (layers, n, d) in SHAPES.items():
        log(f"timing {shape_name}: closed form on {layers} layers")
        start, cpu = time.perf_counter(), time.process_time()
        for layer in range(layers):
            kernel_hull(random_rows(n, d, layer), OPTIONS["closed_form"], device="cpu")
        closed_total, closed_cpu = time.perf_counter() - start, time.process_time() - cpu
        points = random_rows(n, d, 0).double()
        start = time.perf_counter()
        kernel = gaussian_kernel(points, median_distance(points, n), n)   # as kernel_hull does
        setup = time.perf_counter() - start
        del kernel
        log(f"timing {shape_name}: {TIMED_ITERATIONS} iterations on one layer")
        start = time.perf_counter()
        fit = kernel_hull(random_rows(n, d, 0), HullConfig(max_iter=TIMED_ITERATIONS, alpha=1e-9),
                          device="cpu")
        fixed = time.perf_counter() - start
        assert fit.iterations == TIMED_ITERATIONS
        per_iteration = max(fixed - setup, 0.0) / TIMED_ITERATIONS
        out["shapes"][shape_name] = {
            "layers": layers, "n": n, "d": d, "closed_form_measured_s": closed_total,
            "closed_form_cpu_s": closed_cpu,
            "kernel_setup_one_layer_s": setup, "iteration_one_layer_s": per_iteration,
            "goal_s": GOALS[shape_name]}
        log(f"  closed form {closed_total:.1f} s; setup {setup:.2f} s, {per_iteration:.2f} s/iteration")
    out["environment_after"] = environment()
    return out


def iteration_counts(data: dict) -> dict[str, float]:
    """Per iterating option, the larger of the two demos' mean iterations per layer."""
    counts: dict[str, float] = {}
    for part in data.get("demos", {}).values():
        for row in part.get("agreement", []):
            if row["option"] != "closed_form":
                mean = statistics.mean(row["iterations"])
                counts[row["option"]] = max(counts.get(row["option"], 0.0), mean)
    return counts


# One fit in a fresh process; each multiplicative update (``hull._step``, looked up at call time) is
# timed on its own, wall and process CPU, so one iteration's time is measured, not a difference of
# two runs (which a shared machine's changing load made meaningless: one such run gave 10 s).
MEMORY_CHILD = """
import json, resource, sys, time, torch
sys.path.insert(0, {root!r})
import kcm_core.hull as hull
torch.set_num_threads({threads})
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
steps, step = [], hull._step
def timed_step(*args):
    wall, cpu = time.perf_counter(), time.process_time()
    out = step(*args)
    steps.append([time.perf_counter() - wall, time.process_time() - cpu])
    return out
hull._step = timed_step
gen = torch.Generator().manual_seed(0)
points = torch.randn({n}, {d}, generator=gen) * 0.02
base = rss()
wall, cpu = time.perf_counter(), time.process_time()
fit = hull.kernel_hull(points, hull.HullConfig(stop_rule={rule!r}, max_iter={iterations}, alpha=1e-9), device='cpu')
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
assert fit.iterations == (1 if {rule!r} == 'closed_form' else {iterations})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(base=base, peak=peak, wall=wall, cpu=cpu, steps=steps)))
"""


MEMORY_ITERATIONS = 2


def part_memory(n: int, d: int) -> dict:
    """Peak RSS of one fit in a fresh process per rule: the iterating rule for ``MEMORY_ITERATIONS``
    iterations, each timed (wall and CPU); the closed form once. The kernel setup is the rest of the
    fit's time."""
    load_before = os.getloadavg()
    out = {"n": n, "d": d, "environment_before": environment(), "runs": {}}
    for rule, iterations in ((EXACT, MEMORY_ITERATIONS), ("closed_form", 1)):
        log(f"memory: N = {n}, d = {d}, {rule} ({iterations} iteration(s), fresh process)")
        code = MEMORY_CHILD.format(root=str(ROOT), threads=torch.get_num_threads(), n=n, d=d, rule=rule,
                                   iterations=iterations)
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        got = json.loads(proc.stdout)
        bound = hull_memory_bytes(n, d, closed_form=rule == "closed_form")
        run = {"rss_before_bytes": got["base"], "peak_rss_bytes": got["peak"],
               "peak_above_before_bytes": got["peak"] - got["base"], "bound_bytes": bound,
               "seconds": got["wall"], "cpu_seconds": got["cpu"], "iterations": iterations}
        if got["steps"]:
            walls, cpus = [s[0] for s in got["steps"]], [s[1] for s in got["steps"]]
            run.update(iteration_seconds=walls, iteration_cpu_seconds=cpus,
                       setup_seconds=got["wall"] - sum(walls), setup_cpu_seconds=got["cpu"] - sum(cpus))
        out["runs"][rule] = run
        log(f"  peak {got['peak'] / 1e9:.2f} GB, {(got['peak'] - got['base']) / 1e9:.2f} GB above the "
            f"points; bound {bound / 1e9:.2f} GB; {got['wall']:.0f} s wall, {got['cpu']:.0f} s CPU, "
            f"steps {got['steps']}")
    out["environment_after"] = environment()
    out["environment"] = run_environment(load_before)
    return out


# --------------------------------------------------------------------------- the report

def _span(values: list[float], fmt: str) -> str:
    return f"{format(min(values), fmt)} to {format(max(values), fmt)}"


def markdown(data: dict) -> str:
    lines = ["# R2 options against the exact iteration", "",
             f"Command(s): {'; '.join(data.get('commands', []))}", "",
             "Exact = the default absolute rule (change of C at most alpha = 0.01). Shared 2-core "
             "machine: the load average before and after each part is in r2_scale.json.", ""]
    for demo_name, title in TITLES.items():
        part = data.get("demos", {}).get(demo_name)
        if not part:
            continue
        lines += [f"## {title}", ""]
        if "agreement" in part:
            lines += [f"Load average before {part['environment_before']['load_average']}, after "
                      f"{part['environment_after']['load_average']}.", ""] + agreement_table(part)
        down = part.get("downstream")
        if down:
            lines += ["", f"KCM at {down['budget']} relative FLOPs, evaluated on {down['evaluated_on']}, "
                      "each option paired against the exact R2:", ""]
            if down.get("environment"):
                env = down["environment"]
                lines += [f"Machine: {env.get('cpu', '?')}, {env.get('threads', '?')} threads; "
                          f"{env.get('machine_state', '')}.", ""]
            if demo_name in CLASSIFIERS:
                acc = down["unpruned_accuracy"]
                lines += [f"Unpruned accuracy {acc['value']:.3f}.", "",
                          "| option | accuracy | minus exact [95% paired CI] | McNemar p (only option / "
                          "only exact right) | kept neurons shared with exact |", "|---|---|---|---|---|"]
                for r in down["rows"]:
                    v = r["vs_exact"]
                    lines.append(f"| {r['option']} | {r['accuracy']['value']:.3f} | {v['value']:+.4f} "
                                 f"[{v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}] | {v['mcnemar_p']:.3f} "
                                 f"({v['a_only']} / {v['b_only']}) | {r['kept_overlap_with_exact']:.3f} |")
            else:
                lines += ["| option | perplexity | ratio to exact [95% paired CI] | kept neurons shared "
                          "with exact |", "|---|---|---|---|"]
                for r in down["rows"]:
                    v = r["vs_exact"]
                    lines.append(f"| {r['option']} | {r['perplexity']['value']:.2f} | {v['ratio']:.4f} "
                                 f"[{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}] | "
                                 f"{r['kept_overlap_with_exact']:.3f} |")
        if "downstream_runs" in part:
            lines += [""] + lm_downstream_lines(part["downstream_runs"])
        lines.append("")
    timing = data.get("timing")
    counts = iteration_counts(data)
    if timing and counts:
        lines += ["## Whole-model R2 time on random weights", "",
                  f"Load average before {timing['environment_before']['load_average']}, after "
                  f"{timing['environment_after']['load_average']}. Closed form: measured on every layer. "
                  "Iterating rules: **extrapolated** = layers x (kernel setup + iterations x one "
                  f"iteration), timed on one layer with {TIMED_ITERATIONS} iterations, with the mean "
                  "iterations per layer measured on the demos' real weights (the larger demo's mean): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in counts.items()) + ".",
                  "Process CPU seconds of the closed form beside its wall time: on an idle 2-core "
                  "machine wall time is about CPU time / 2.",
                  "", "| shape | goal (s) | closed form, measured wall (CPU) s | kernel setup, one layer (s) | "
                  "one iteration, one layer (s) | "
                  + " | ".join(f"{k}, extrapolated (s)" for k in counts) + " |",
                  "|---|---|---|---|---|" + "---|" * len(counts)]
        for name, s in timing["shapes"].items():
            lines.append(f"| {name} ({s['layers']} x {s['n']}, d {s['d']}) | {s['goal_s']:.0f} | "
                         f"{s['closed_form_measured_s']:.1f} ({s.get('closed_form_cpu_s', float('nan')):.1f}) | "
                         f"{s['kernel_setup_one_layer_s']:.2f} | "
                         f"{s['iteration_one_layer_s']:.2f} | "
                         + " | ".join(f"{s['layers'] * (s['kernel_setup_one_layer_s'] + c * s['iteration_one_layer_s']):.0f}"
                                      for c in counts.values()) + " |")
        lines.append("")
    memory = data.get("memory")
    if memory:
        lines += [f"## Memory of one fit at N = {memory['n']}, d = {memory['d']} (fresh process each)", ""]
        lines += memory_lines(memory, exact_iterations(data)) + [""]
    return "\n".join(lines)


def exact_iterations(data: dict) -> int | None:
    """The most iterations the exact rule took on any layer of either demo (from the stored
    agreement rows), or None when none are stored."""
    counts = [max(row["iterations"]) for part in data.get("demos", {}).values()
              for row in part.get("agreement", []) if row["option"] == EXACT]
    return max(counts) if counts else None


def memory_lines(memory: dict, iterations: int | None) -> list[str]:
    """The memory part as a table: peak RSS against the stated bound, the measured times, and the
    exact fit's time extrapolated (labelled) from one iteration's measured time."""
    from common import machine_line
    lines = ["| rule | peak RSS (GB) | above the points (GB) | stated bound (GB) | measured, wall (CPU) | "
             "whole fit, wall (CPU) |", "|---|---|---|---|---|---|"]
    for rule, r in memory["runs"].items():
        head = (f"| {rule} | {r['peak_rss_bytes'] / 1e9:.2f} | {r['peak_above_before_bytes'] / 1e9:.2f} | "
                f"{r['bound_bytes'] / 1e9:.2f} | ")
        if "iteration_seconds" in r:
            its, cpus = r["iteration_seconds"], r["iteration_cpu_seconds"]
            one, one_cpu = statistics.median(its), statistics.median(cpus)
            whole = (f"**extrapolated**: {r['setup_seconds'] + iterations * one:,.0f} s "
                     f"({r['setup_cpu_seconds'] + iterations * one_cpu:,.0f} s) at {iterations} iterations "
                     "(the most any demo layer took)" if iterations else "")
            lines.append(head + f"{len(its)} iterations in {r['seconds']:.0f} s ({r['cpu_seconds']:.0f} s): "
                         f"kernel setup {r['setup_seconds']:.0f} s ({r['setup_cpu_seconds']:.0f} s), each "
                         "iteration " + ", ".join(f"{w:.0f} s ({c:.0f} s)" for w, c in zip(its, cpus))
                         + f" | {whole} |")
        else:
            lines.append(head + f"{r['seconds']:.0f} s ({r['cpu_seconds']:.0f} s) | the same (one step) |")
    if "environment" in memory:
        lines += ["", machine_line(memory["environment"])]
    return lines


def agreement_table(part: dict) -> list[str]:
    lines = ["| option | iterations per layer | Spearman vs exact (min / median) | "
             "top-40% overlap (min / median) | R2 time (s) | time / exact |",
             "|---|---|---|---|---|---|"]
    for r in part["agreement"]:
        its = r["iterations"]
        lines.append(f"| {r['option']} | {min(its)} to {max(its)} | {min(r['spearman']):.4f} / "
                     f"{statistics.median(r['spearman']):.4f} | {min(r['top40_overlap']):.3f} / "
                     f"{statistics.median(r['top40_overlap']):.3f} | {r['seconds_total']:.1f} | "
                     f"{r['time_vs_exact']:.3f} |")
    return lines


def lm_downstream_lines(down: dict) -> list[str]:
    """KCM on the LM demo with each option's R2, per budget, paired against the exact R2."""
    from kcm_core.lm import bootstrap_p_text
    from common import machine_line
    runs = down["runs"]
    budgets = [run["budget"] for run in runs]
    lines = [f"Perplexity of KCM with each option's R2 at relative FLOPs {', '.join(map(str, budgets))}, "
             f"on {runs[0]['evaluated_on']} (unpruned {runs[0]['unpruned_perplexity']['value']:.2f}); "
             "each option's ratio to the exact R2's perplexity on the same blocks [paired 95% bootstrap "
             "interval over blocks], bootstrap p of ratio 1, and the share of kept neurons both choose:",
             "", "| option | R2 iterations per layer | R2 time, all layers (s) | "
             + " | ".join(f"perplexity at {b} | ratio to exact at {b} [95% CI], p | kept shared at {b}"
                          for b in budgets) + " |",
             "|---|---|---|" + "---|---|---|" * len(budgets)]
    for name, fit in down["fits"].items():
        its = fit["iterations"]
        cells = []
        for run in runs:
            row = next(r for r in run["rows"] if r["option"] == name)
            v = row["vs_exact"]
            ratio = ("(the exact R2)" if name == EXACT else
                     f"{v['ratio']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}], p {bootstrap_p_text(v['p_value'])}")
            cells += [f"{row['perplexity']['value']:.1f}", ratio, f"{row['kept_overlap_with_exact']:.3f}"]
        lines.append(f"| {name} | {min(its)} to {max(its)} | {fit['seconds_total']:.0f} | " + " | ".join(cells) + " |")
    lines += ["", machine_line(down["environment"]), f"Command: `{down['environment']['command']}`."]
    return lines


def save(results: dict) -> None:
    """Merge ``results`` into r2_scale.json (demos one by one) and rewrite r2_scale.md. The file is
    read only now, so parts run by separate processes do not overwrite each other."""
    path = RESULTS / "r2_scale.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    for key, value in results.items():
        if key == "demos":       # per demo, only the entries this run measured are replaced
            for demo_name, entries in value.items():
                data.setdefault("demos", {}).setdefault(demo_name, {}).update(entries)
        else:
            data[key] = value
    command = shlex.join(["python"] + sys.argv)
    data["commands"] = [c for c in data.get("commands", []) if c != command] + [command]
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    (RESULTS / "r2_scale.md").write_text(markdown(data))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="agreement,downstream,timing,memory")
    parser.add_argument("--demos", default="classifier,lm",
                        help="classifier, lm, and the prepared tasks hedge and fine-foods")
    parser.add_argument("--options", default=",".join(OPTIONS), help="options compared with the exact R2")
    parser.add_argument("--downstream-options", default=None,
                        help="options pruned and evaluated (default: all of --options)")
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--budget", type=float, default=0.6, help="classifier relative FLOPs")
    parser.add_argument("--lm-budget", default="0.9", help="LM relative FLOPs, one or several (0.8,0.9)")
    parser.add_argument("--memory-n", type=int, default=11008)
    parser.add_argument("--memory-d", type=int, default=4096)
    parser.add_argument("--render-only", action="store_true", help="rewrite r2_scale.md from r2_scale.json, measuring nothing")
    args = parser.parse_args()
    if args.render_only:
        (RESULTS / "r2_scale.md").write_text(markdown(json.loads((RESULTS / "r2_scale.json").read_text())))
        return 0
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    options = [o.strip() for o in args.options.split(",") if o.strip()]
    demos = [d.strip() for d in args.demos.split(",") if d.strip()]
    downstream = ([o.strip() for o in args.downstream_options.split(",") if o.strip()]
                  if args.downstream_options else options)
    unknown = ([o for o in options + downstream if o not in OPTIONS]
               + sorted(parts - {"agreement", "downstream", "timing", "memory"})
               + [d for d in demos if d not in TITLES])
    if unknown:
        sys.exit(f"unknown option or part: {', '.join(unknown)}")
    if parts & {"agreement", "downstream"}:
        part_agreement_and_downstream(parts, demos, options, downstream, args.eval_blocks, args.budget,
                                      [float(b) for b in args.lm_budget.split(",") if b.strip()])
    if "timing" in parts:
        save({"timing": part_timing()})
    if "memory" in parts:
        save({"memory": part_memory(args.memory_n, args.memory_d)})
    print(markdown(json.loads((RESULTS / "r2_scale.json").read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())

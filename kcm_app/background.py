"""No cold waits in a demo: as soon as a model and data are loaded, one background thread per
(model, data, seed) computes what the pages show first (the unpruned model's evaluation, KCM's scores,
the default budget, the Fisher gradients when the data has labels, the UMAP of layer 0), through
the same shared stores the pages use, so a page asking for one of them waits for that computation
instead of starting its own, and the slow parts land in the disk cache (``kcm_app.disk_cache``) for the
next start. The model is only read; hooks run on private copies (``kcm_app.engine``). No Streamlit here.
"""
from __future__ import annotations

import atexit
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

from kcm_core.pipeline import PruneConfig
from kcm_core.runtime import Progress

from . import engine
from .live import log
from .engine import Workspace
from .store import SharedStore


# What the first view of each page needs, the landing page's first: the Model page the unpruned
# evaluation, the Prune page the scores and the default budget, the Scores page the gradients too, the
# Kernel hull page its UMAP (slowest: umap-learn's first call compiles it).
UNPRUNED, SCORES, BUDGET, GRADIENTS, UMAP = ("the unpruned model", "KCM scores", "the default budget",
                                             "Fisher gradients", "UMAP of layer 0")


class Stopped(Exception):
    """Raised inside a step's progress report once its work was asked to stop."""


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[[Progress], object]


class Precompute:
    """The background work for one workspace: its steps, where it is, what failed."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps
        self.current = ""
        self.message = "starting"
        self.fraction = 0.0
        self.finished: list[str] = []
        self.errors: dict[str, str] = {}
        self.stopped: list[str] = []       # steps cut short or never started because of ``stop``
        self.seconds = 0.0
        self._done = threading.Event()
        self._stop = threading.Event()

    def stop(self) -> None:
        """Stop at the running step's next progress report (a layer, a batch) and skip the rest: the
        pages then compute what they need when opened, with their own progress."""
        self._stop.set()

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait_done(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def has(self, name: str) -> bool:
        """Whether step ``name`` is over (finished or failed), or was never part of this work."""
        return (self.done or name in self.finished or name in self.errors or name in self.stopped
                or name not in self.names)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.steps]

    def run(self) -> None:
        _RUNNING.add(self)                    # stopped at exit (``stop_all``)
        start = time.perf_counter()
        for i, step in enumerate(self.steps):
            if self._stop.is_set():
                self.stopped.append(step.name)
                continue
            self.current, self.message = step.name, "starting"

            def progress(message: str, fraction: float, i=i) -> None:
                if self._stop.is_set():
                    raise Stopped(step.name)
                self.message, self.fraction = message, (i + min(max(fraction, 0.0), 1.0)) / len(self.steps)
            try:
                step.run(progress)
                self.finished.append(step.name)
            except Stopped:
                self.stopped.append(step.name)
                log.info("background %s stopped", step.name)
            except Exception as err:          # the page that needs it computes it again and shows the error
                self.errors[step.name] = str(err)
                log.warning("background %s failed: %s", step.name, err)
        self.seconds = time.perf_counter() - start
        self.current, self.message, self.fraction = "", "done", 1.0
        self._done.set()
        log.info("background work done in %.1f s: %s", self.seconds, ", ".join(self.finished))

    def wait_for(self, name: str, progress: Progress | None = None, poll: float = 0.2) -> None:
        """Block while step ``name`` is the one running, drawing this work's progress on ``progress``:
        the page then reads its result instead of computing it a second time. A step not started yet
        is not waited for (the page computes it, and the background finds it stored)."""
        while self.current == name and not self.done:
            if progress is not None:
                progress(f"{name} (background): {self.message}", self.fraction)
            time.sleep(poll)


def default_config(ws: Workspace, seed: int) -> PruneConfig:
    """The configuration a new session's Prune page opens on (KCM at the default budget)."""
    from .state import DEFAULTS, clamp_budget, default_budget
    return PruneConfig(method=ws.default_method, budget=clamp_budget(default_budget(ws.is_lm), ws.floor),
                       multiple=DEFAULTS.multiple, scale_samples=engine.scale_samples(ws), seed=seed)


def steps_for(ws: Workspace, seed: int, store: SharedStore) -> list[Step]:
    config = default_config(ws, seed)
    if ws.streamed:          # layer by layer: nothing runs the whole model (no evaluations, no gradients)
        return [Step(SCORES, lambda p: engine.method_scores(ws, config, store, p)),
                Step(UMAP, lambda p: engine.layer_umap(ws, 0, seed, store))]
    steps = []
    if ws.is_lm:
        steps.append(Step(UNPRUNED, lambda p: engine.reference_lm(ws, store, p)))
    elif ws.eval_batches is not None:
        steps.append(Step(UNPRUNED, lambda p: engine.reference(ws, store, p)))
    steps.append(Step(SCORES, lambda p: engine.method_scores(ws, config, store, p)))
    if ws.eval_batches is not None:
        steps.append(Step(BUDGET, lambda p: engine.evaluate_budget(ws, config, store, p)))
    if ws.labeled is not None:
        fisher = PruneConfig(method="mask-tuning", scale_samples=config.scale_samples, seed=seed)
        steps.append(Step(GRADIENTS, lambda p: engine.gradient_scores(ws, fisher, store, p)))
    steps.append(Step(UMAP, lambda p: engine.layer_umap(ws, 0, seed, store)))
    return steps


_RUNNING: "weakref.WeakSet[Precompute]" = weakref.WeakSet()
EXIT_WAIT_S = 60.0


@atexit.register
def stop_all(timeout: float = EXIT_WAIT_S) -> None:
    """Stop every background work of this process and wait for it to end. Run at exit: the work runs in
    daemon threads, and one killed by the interpreter's shutdown inside torch's C++ code aborts the
    process ("terminate called without an active exception", exit code 134)."""
    works = [work for work in list(_RUNNING) if not work.done]
    for work in works:
        work.stop()
    deadline = time.monotonic() + timeout
    for work in works:
        work.wait_done(max(0.0, deadline - time.monotonic()))


def start(ws: Workspace, seed: int, store: SharedStore, registry: dict, lock: threading.Lock) -> Precompute:
    """The background work for (``ws``, ``seed``), started on the first call (``registry``, guarded by
    ``lock``, is shared by every session of this server)."""
    key = (ws.model_key, ws.data_key, seed)
    with lock:
        work = registry.get(key)
        if work is None:
            work = registry[key] = Precompute(steps_for(ws, seed, store))
            threading.Thread(target=work.run, daemon=True, name="kcm-precompute").start()
    return work

"""A thread-safe, bounded result store shared by every browser session.

Streamlit runs each session in its own thread. ``st.cache_resource`` hands all of them one
``SharedStore`` per kind of result (scores, evaluations, projections, ...); ``get_or_compute`` makes
sure a result is computed once even when two sessions ask for it at the same moment (the second waits
for the first), and lets the caller show its own progress bar while computing, which a cached function
cannot do without replaying Streamlit elements. Stored values are treated as read-only by everyone.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Callable, Hashable, TypeVar

from kcm_core.runtime import Progress

T = TypeVar("T")
# How often a caller waiting for another thread's computation of the same key reports it.
WAIT_POLL_S = 0.5
# What a waiting caller says it waits for, by the first element of the key.
WAITING_FOR = {"dense": "the unpruned model's evaluation", "dense-lm": "the unpruned model's evaluation",
               "r2": "the kernel hull fits (R2)", "stats": "the activation statistics (D2)",
               "grads": "the Fisher gradients", "teacher": "the unpruned model's FFN outputs",
               "scores": "the neuron scores", "budget": "this budget's evaluation",
               "speed": "this budget's timing", "generate": "this budget's continuations"}


def describe(key: Hashable) -> str:
    head = key[0] if isinstance(key, tuple) and key else key
    return WAITING_FOR.get(head, "a result") if isinstance(head, str) else "a result"


class SharedStore:
    """Least-recently-used mapping with one lock per key being computed."""

    def __init__(self, max_entries: int = 256) -> None:
        if max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self.max_entries = max_entries
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._key_locks: dict[Hashable, threading.Lock] = {}

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def get(self, key: Hashable, default: Any = None) -> Any:
        with self._lock:
            if key not in self._items:
                return default
            self._items.move_to_end(key)
            return self._items[key]

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.max_entries:
                self._items.popitem(last=False)

    def get_or_compute(self, key: Hashable, compute: Callable[[], T],
                       progress: Progress | None = None) -> T:
        """The stored value for ``key``, computing it once (other callers for the key wait).

        While another thread computes it (a background step, another session), ``progress`` hears
        every ``WAIT_POLL_S`` seconds that this caller is waiting for it; a progress callback that
        raises (an abandoned job, ``kcm_app.live``) ends the wait with that exception, so a caller
        blocked behind someone else's work can still be stopped."""
        missing = object()
        value = self.get(key, missing)
        if value is not missing:
            return value
        with self._lock:
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        waited = 0.0
        while not key_lock.acquire(timeout=WAIT_POLL_S):
            waited += WAIT_POLL_S
            if progress is not None:
                progress(f"waiting for {describe(key)}, computed for another view ({waited:.0f} s)", 0.0)
        try:
            value = self.get(key, missing)
            if value is missing:          # nobody computed it while we waited
                value = compute()         # an exception leaves nothing stored
                self.put(key, value)
        finally:
            key_lock.release()
        with self._lock:
            self._key_locks.pop(key, None)
        return value

    def keys(self) -> list[Hashable]:
        with self._lock:
            return list(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

"""Data-parallel calibration over ``torch.distributed``: one ``Group`` says which share of the work
this process does and sums what the shares produced.

Under ``torchrun`` (or ``accelerate launch``, which sets the same ``RANK`` / ``WORLD_SIZE`` /
``MASTER_ADDR`` variables) ``from_env`` joins the process group: gloo on the CPU, NCCL when CUDA is
there (each rank on GPU ``LOCAL_RANK``). Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) it
returns ``SINGLE``, which never touches ``torch.distributed``: every method is then the identity, so
library code takes a ``group`` argument and runs the same lines in one process or in many.

What is split: whole calibration batches, round robin (batch ``b`` to rank ``b % world_size``), so
every per-batch quantity is computed exactly as in one process and only the order of the float64
sums changes; and R2's layers (layer ``l`` on rank ``l % world_size``), gathered afterwards, so
every rank ends with every layer's fit.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import torch

from .runtime import default_device

T = TypeVar("T")

class StoppedOnMain(ValueError):
    """Raised on the other ranks when rank 0 refused something (``only_main``): rank 0 already
    said why, so the other ranks stop with the same message and need not repeat it."""


@dataclass(frozen=True)
class Group:
    """This process's place among ``world_size`` cooperating processes (``SINGLE``: alone)."""

    rank: int = 0
    world_size: int = 1
    backend: str | None = None        # "gloo" or "nccl"; None when alone

    def __post_init__(self):
        if not (isinstance(self.world_size, int) and self.world_size >= 1):
            raise ValueError(f"world_size must be a positive integer, got {self.world_size!r}")
        if not (isinstance(self.rank, int) and 0 <= self.rank < self.world_size):
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank!r}")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, writes files and reports."""
        return self.rank == 0

    def record(self) -> dict[str, object]:
        """What a report records of the processes that made it (nothing for a single process, so a
        single-process report is unchanged)."""
        return {"ranks": self.world_size, "backend": self.backend} if self.distributed else {}

    def share(self, items: Iterable[T]) -> Iterator[T]:
        """This rank's items, lazily (a stream stays a stream): every ``world_size``-th one,
        starting at ``rank``; empty when there are fewer items than ranks."""
        return itertools.islice(items, self.rank, None, self.world_size)

    def share_count(self, total: int) -> int:
        """How many of ``total`` items ``share`` gives this rank."""
        return len(range(self.rank, total, self.world_size))

    def sum_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Replace each tensor by its sum over all ranks, in place (alone: leave them as they are).

        NCCL reduces only GPU tensors, so under NCCL each tensor travels through this rank's GPU."""
        if not self.distributed:
            return
        import torch.distributed as dist
        device = _collective_device(self.backend)
        for t in tensors:
            buf = t if t.device == device else t.to(device)
            dist.all_reduce(buf, op=dist.ReduceOp.SUM)
            if buf is not t:
                t.copy_(buf)

    def map_layers(self, count: int, fn: Callable[[int], T]) -> list[T]:
        """``[fn(0), ..., fn(count - 1)]`` on every rank, each ``fn(l)`` computed once, by rank
        ``l % world_size``; the results are exchanged with ``all_gather_object`` (pickled)."""
        mine = {layer: fn(layer) for layer in range(self.rank, count, self.world_size)}
        if not self.distributed:
            return [mine[layer] for layer in range(count)]
        import torch.distributed as dist
        gathered: list[dict[int, T] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, mine)
        merged = {layer: value for part in gathered for layer, value in (part or {}).items()}
        return [merged[layer] for layer in range(count)]

    def only_main(self, fn: Callable[[], T]) -> T | None:
        """Run ``fn`` on rank 0 only (the other ranks get None). When it raises (bad input: an output
        folder that exists, say), rank 0 raises that and every other rank raises ``StoppedOnMain``,
        so all stop at once instead of waiting for rank 0 in a later collective."""
        if not self.distributed:
            return fn()
        import torch.distributed as dist
        result, failure = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as err:          # re-raised below once the others know
                failure = err
        verdict = [None if failure is None else str(failure)]
        dist.broadcast_object_list(verdict, src=0)
        if failure is not None:
            raise failure
        if verdict[0] is not None:
            raise StoppedOnMain(verdict[0])
        return result

    def main_first(self, fn: Callable[[], T]) -> T:
        """Rank 0 runs ``fn`` first (it may fill a cache: a demo, a downloaded dataset), then the other
        ranks run it (finding the cache filled); a failure on rank 0 stops every rank (``only_main``)."""
        result = self.only_main(fn)
        return result if self.is_main else fn()


SINGLE = Group()


def _collective_device(backend: str | None) -> torch.device:
    """Where tensors must be for a collective: this rank's GPU under NCCL (``from_env`` made it the
    current one, so ``default_device()`` names it), the CPU under gloo."""
    return default_device() if backend == "nccl" else torch.device("cpu")


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None:
        if default is None:
            raise ValueError(f"{name} is not set; start the processes with torchrun (or accelerate "
                             "launch), which sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
        return default
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name} must be a whole number, got {text!r}; it is set by torchrun "
                         "(or accelerate launch)") from None


# MPI launchers (mpirun, srun, and ``accelerate launch --cpu --mpirun_hostfile``) describe the ranks in
# their own variables, which this module does not read: each process would run alone and write alone.
_MPI_WORLD_SIZES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")


def launched() -> bool:
    """Whether a launcher started this process as one of several (``WORLD_SIZE`` > 1). A process that
    an MPI launcher started as one of several, without ``WORLD_SIZE``, is refused (``ValueError``)."""
    if _env_int("WORLD_SIZE", 1) > 1:
        return True
    if "WORLD_SIZE" not in os.environ:
        for name in _MPI_WORLD_SIZES:
            if _env_int(name, 1) > 1:
                raise ValueError(f"{name} is {os.environ[name]}: an MPI launcher started this process as one "
                                 "of several, but kcm_core reads only torch's RANK and WORLD_SIZE, so each "
                                 "would run alone; start the processes with torchrun or accelerate launch "
                                 "--multi_gpu (which also runs on a CPU-only machine, with gloo)")
    return False


def from_env() -> Group:
    """Join the process group the launcher describes in the environment, or ``SINGLE`` without one.

    The backend is NCCL when CUDA is available (this rank then uses GPU ``LOCAL_RANK``, so
    ``kcm_core.runtime.default_device()`` names it), else gloo."""
    if not launched():
        return SINGLE
    world_size = _env_int("WORLD_SIZE")
    import torch.distributed as dist
    rank = _env_int("RANK")
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed; run in a single process")
    if dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size(), dist.get_backend())
    if torch.cuda.is_available():
        backend = "nccl"
        local_rank, gpus = _env_int("LOCAL_RANK", 0), torch.cuda.device_count()
        if local_rank >= gpus:      # NCCL cannot put two ranks on one GPU
            raise ValueError(f"LOCAL_RANK is {local_rank} but this machine has {gpus} GPU(s); start at "
                             f"most {gpus} processes per machine (torchrun --nproc-per-node {gpus})")
        torch.cuda.set_device(local_rank)
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend)
    return Group(rank, world_size, backend)


@contextlib.contextmanager
def session() -> Iterator[Group]:
    """``from_env()`` for the length of a block; leaves the process group it joined when the block
    ends (a group that was already there is left to its owner)."""
    import torch.distributed as dist
    joined = dist.is_available() and not dist.is_initialized()
    group = from_env()
    try:
        yield group
        if group.distributed and joined:
            # Every rank past its last collective before any leaves: a rank that tore its group down
            # while the other was still finishing an all_reduce aborted it (SIGABRT, gloo).
            dist.barrier()
    finally:
        if group.distributed and joined and dist.is_initialized():
            dist.destroy_process_group()

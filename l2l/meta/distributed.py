"""Data-parallel meta-training: how an epoch's instances split into shards, and the collectives that join them.

Each epoch's K optimizee instances are split into ``S = world_size * accumulate`` equal shards.
Process ``r`` of a torch.distributed group owns shards ``r * accumulate ... (r + 1) * accumulate - 1``
and backpropagates them one after another; the meta-gradients and meta-losses are then summed
over all shards in one all-reduce and divided by S, so every process applies the same Adam step
to the same weights. Shard ``g`` of S always draws its instances and minibatches from the same
seeded streams, whichever process computes it: two processes with ``accumulate=1`` compute
exactly what one process with ``accumulate=2`` does, and a run can resume under any
``(world_size, accumulate)`` with the same S.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from l2l.config import ConfigError


# How much of a failed process's error message the other processes receive.
ERROR_MESSAGE_BYTES = 512

# What a process of a group tells the others of, rather than leaving them waiting in a collective: its errors, and a
# Ctrl-C that reached it alone (processes started by hand; torchrun signals them all), which then stops them all.
REPORTED = (Exception, KeyboardInterrupt)


@dataclass(frozen=True)
class ShardLayout:
    """Which shards of an epoch's meta-batch this process computes.

    Attributes:
        rank: this process's rank in the group (0 without torch.distributed).
        world_size: processes in the group (1 without torch.distributed).
        accumulate: shards each process backpropagates one after another per meta-step.
    """

    rank: int = 0
    world_size: int = 1
    accumulate: int = 1

    @property
    def total(self) -> int:
        """S, the number of shards the epoch's instances are split into."""
        return self.world_size * self.accumulate

    @property
    def local(self) -> range:
        """Global indices of the shards this process computes."""
        return range(self.rank * self.accumulate, (self.rank + 1) * self.accumulate)

    @property
    def is_main(self) -> bool:
        """Whether this process validates, writes checkpoints and shows progress."""
        return self.rank == 0

    def shard_size(self, instances: int) -> int:
        """Instances per shard; raises ConfigError unless ``instances`` splits evenly."""
        if instances % self.total:
            raise ConfigError(
                f"{instances} instances per epoch cannot be split into {self.total} equal shards "
                f"({self.world_size} processes x accumulate {self.accumulate}); choose --instances as a multiple of {self.total}"
            )
        return instances // self.total


def current_layout(accumulate: int = 1) -> ShardLayout:
    """The layout of this process: its rank and world size if torch.distributed is initialised, else one process."""
    if dist.is_available() and dist.is_initialized():
        return ShardLayout(dist.get_rank(), dist.get_world_size(), accumulate)
    return ShardLayout(0, 1, accumulate)


def launched_by_torchrun() -> bool:
    """Whether this process was started by torchrun (its environment names a rank and a world size)."""
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE"))


def local_device(device: torch.device) -> torch.device:
    """The device of this process: ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun, anything else is kept.

    Raises:
        ConfigError: an explicit ``cuda:N`` under torchrun with several processes per node, which
            would put them all on one GPU (NCCL refuses that, or hangs).
    """
    if device.type != "cuda" or not launched_by_torchrun():
        return device
    if device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if per_node > 1:
        raise ConfigError(
            f"--device {device} would put all {per_node} processes of this node on one GPU; "
            "pass --device cuda, which gives each process the GPU of its LOCAL_RANK"
        )
    return device


@contextlib.contextmanager
def process_group_from_environment(device: torch.device) -> Iterator[bool]:
    """Starts the default process group for the duration of the block if torchrun launched this process.

    NCCL serves CUDA devices, Gloo the CPU. Yields whether a group was started (False for a plain
    ``python`` or ``l2l`` invocation, or where the caller has already initialised one).

    Raises:
        RuntimeError: torch.distributed is not available in this build of torch.
    """
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        yield False
        return
    if not dist.is_available():
        raise RuntimeError("this process was launched by torchrun, but this build of torch has no torch.distributed")
    device = local_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # torch._dynamo imported after the group starts (torch.optim imports it at its first step) keeps
    # the group alive past destroy_process_group: Gloo's worker threads then outlive it and, if one
    # frees a finished collective's tensors while the interpreter exits, abort the process
    # ("terminate called without an active exception", exit -6, after a successful run).
    import torch._dynamo  # noqa: F401

    dist.init_process_group(backend)
    try:
        yield True
    finally:
        dist.destroy_process_group()


class Collectives:
    """The few collectives meta-training needs; each is a no-op for a single process.

    Tensors may live anywhere: they travel through the backend's device (CUDA for NCCL, the CPU
    otherwise) and come back in place.
    """

    def __init__(self, layout: ShardLayout):
        self.layout = layout
        self.active = layout.world_size > 1
        if self.active and not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"a layout of {layout.world_size} processes needs an initialised torch.distributed group")
        self.device = torch.device("cpu")
        if self.active and dist.get_backend() == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    def _through_backend(self, tensor: Tensor) -> Tensor:
        return tensor if tensor.device == self.device else tensor.to(self.device)

    def sum_(self, tensor: Tensor) -> Tensor:
        """Sums ``tensor`` over the processes, in place; returns it."""
        if self.active:
            moved = self._through_backend(tensor)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            if moved is not tensor:
                tensor.copy_(moved)
        return tensor

    def broadcast_(self, tensor: Tensor, source: int = 0) -> Tensor:
        """Overwrites ``tensor`` on every process with the one of rank ``source``; returns it."""
        if self.active:
            moved = self._through_backend(tensor)
            dist.broadcast(moved, src=source)
            if moved is not tensor:
                tensor.copy_(moved)
        return tensor

    def gather(self, tensor: Tensor) -> list[Tensor]:
        """``tensor`` of every process, in rank order, on the CPU (every process gets all; equal shapes)."""
        if not self.active:
            return [tensor.cpu()]
        moved = self._through_backend(tensor.contiguous())
        pieces = [torch.empty_like(moved) for _ in range(self.layout.world_size)]
        dist.all_gather(pieces, moved)
        return [piece.cpu() for piece in pieces]

    def gather_together(self, what: str, build: Callable[[], Tensor], size: int, dtype: torch.dtype = torch.uint8) -> list[Tensor]:
        """:meth:`gather` of the tensor ``build()`` makes, which stops every process if ``build`` fails on any.

        A process whose ``build`` raised sends ``size`` zeros instead and says so in the same
        gather (one element more), so every process raises there, as after :meth:`together`,
        at no cost of a collective of its own (one more on the failure path only).

        Args:
            what: what ``build`` does, for the others' message.
            build: process-local work (no collectives) that makes this process's tensor of
                ``size`` elements of ``dtype``.
            size: the number of elements ``build()`` makes, the same on every process.
            dtype: their dtype.

        Returns:
            Every process's ``build()``, flattened, in rank order, on the CPU.
        """
        if not self.active:
            return [build().reshape(-1).cpu()]
        error = None
        try:
            local = build().reshape(-1)
            if local.numel() != size or local.dtype != dtype:  # its gather would not fit the others'
                raise ValueError(f"{what} made {local.numel()} elements of {local.dtype}, not {size} of {dtype}")
        except REPORTED as caught:
            error, local = caught, torch.zeros(size, dtype=dtype)
        flag = torch.tensor([error is not None], dtype=dtype, device=local.device)
        pieces = self.gather(torch.cat([local, flag]))
        self.raise_failures([float(piece[-1]) for piece in pieces], error, what)
        return [piece[:-1] for piece in pieces]

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process (every process gets the same answer)."""
        if not self.active:
            return flag
        return bool(self.sum_(torch.tensor([int(flag)], device=self.device)).item())

    @contextlib.contextmanager
    def together(self, what: str, sums: Tensor | None = None) -> Iterator[None]:
        """Runs a block of process-local work that stops every process if it fails on any.

        A process whose block raised (a KeyboardInterrupt included) re-raises its own error; the
        others raise a RuntimeError naming ``what``, the process that failed and its error, instead
        of waiting in their next collective for a process that has gone. The block must not use collectives itself (a
        process leaving it early would leave the others waiting inside it).

        Args:
            what: what the block does, for the others' message ("loading the resume checkpoint").
            sums: a floating-point tensor on the CPU the block may fill in; after the block it
                holds its sum over the processes, taken in the one collective that also tells
                every process whether any failed.
        """
        try:
            yield
        except REPORTED as error:
            self._settle(error, what, sums)
            raise
        self._settle(None, what, sums)

    def _settle(self, error: BaseException | None, what: str, sums: Tensor | None) -> None:
        """The one collective after a :meth:`together` block: sums ``sums`` and the failure flags; raises if any failed."""
        if not self.active:
            return
        values = torch.zeros(0) if sums is None else sums.reshape(-1)
        summed = self.sum_(torch.cat([values, torch.tensor(self.failure_flags(error), dtype=values.dtype)]))
        self.raise_failures(summed[values.numel() :].tolist(), error, what)
        if sums is not None:
            sums.copy_(summed[: values.numel()].view_as(sums))

    def failure_flags(self, error: BaseException | None) -> list[float]:
        """One entry per process: 1.0 at this process's rank if ``error`` is set, else 0.0.

        Appended to a tensor that every process is about to sum anyway (the meta-gradients), the
        summed flags tell every process which processes failed, at no cost of a collective of
        their own; :meth:`raise_failures` reads them.
        """
        return [float(error is not None and rank == self.layout.rank) for rank in range(self.layout.world_size)]

    def raise_failures(self, flags: Sequence[float], error: BaseException | None, what: str) -> None:
        """Raises on every process if the summed :meth:`failure_flags` say that any process failed.

        Every process must call this with the same flags. After a failure the processes exchange
        their errors' messages and what they were doing (one more collective, on the failure path
        only); a process whose own ``error`` is set re-raises it, the others raise a RuntimeError
        naming each process that failed, its error and what it was doing when it failed, which
        need not be what the others were doing (a process that failed after one all-reduce
        reports it in the next).

        Args:
            flags: the summed :meth:`failure_flags`.
            error: this process's own error, or None.
            what: what this process was doing, for the others' message if ``error`` is set.
        """
        failed = [rank for rank, flag in enumerate(flags) if flag]
        if not failed:
            return
        try:
            reports = self._error_reports(error, what)
        except Exception:
            if error is None:
                raise
            # Another failed process may have gone without the exchange (a Ctrl-C that reached it too): this one's own
            # error still says best why it stops, not the backend's.
        if error is not None:
            raise error
        who = f"process {failed[0]}" if len(failed) == 1 else f"processes {', '.join(map(str, failed))}"
        doing = {reports[rank][0] for rank in failed}
        if len(doing) == 1:
            details = "; ".join(reports[rank][1] if len(failed) == 1 else f"process {rank}: {reports[rank][1]}" for rank in failed)
            raise RuntimeError(f"{who} failed while {doing.pop()} ({details}); this process stops too")
        details = "; ".join(f"process {rank} while {reports[rank][0]}: {reports[rank][1]}" for rank in failed)
        raise RuntimeError(f"{who} failed ({details}); this process stops too")

    def _error_reports(self, error: BaseException | None, what: str) -> list[tuple[str, str]]:
        """Every process's ``(what, "TYPE: message")`` of ``error`` (empty where none), in rank order, cut to a few hundred bytes each."""
        parts = ("", "") if error is None else (what, f"{type(error).__name__}: {error}" if str(error) else type(error).__name__)
        buffer = torch.zeros(2, ERROR_MESSAGE_BYTES, dtype=torch.uint8)
        for row, text in zip(buffer, parts):
            encoded = text.encode()[:ERROR_MESSAGE_BYTES]
            row[: len(encoded)] = torch.tensor(list(encoded), dtype=torch.uint8)
        texts = [[bytes(row.tolist()).rstrip(b"\0").decode(errors="ignore") for row in piece] for piece in self.gather(buffer)]
        return [(doing, message) for doing, message in texts]

    def check_same(self, description: str, text: str) -> None:
        """Raises ConfigError on every process unless every process passed the same ``text``.

        Args:
            description: what ``text`` is, for the message ("configuration").
            text: the value to compare, for example a configuration as JSON.
        """
        if not self.active:
            return
        digest = hashlib.sha256(text.encode()).digest()[:8]
        local = torch.tensor(list(digest), dtype=torch.uint8)
        others = [rank for rank, piece in enumerate(self.gather(local)) if not piece.equal(local)]
        if others:
            raise ConfigError(
                f"process {self.layout.rank} and process(es) {', '.join(map(str, others))} were started with a different "
                f"{description}; launch every process with the same arguments"
            )


def flatten_grads(parameters: Sequence[Tensor]) -> Tensor:
    """The gradients of ``parameters`` in one flat vector (zeros where a parameter has none; see :func:`grad_presence`)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in parameters])


def grad_presence(parameters: Sequence[Tensor]) -> list[float]:
    """One entry per parameter: 1.0 where it has a gradient, 0.0 where it has none.

    Summed over the shards along with :func:`flatten_grads`' vector, it counts the shards that
    gave each parameter a gradient: one that none did (a per-group rule's LSTM for a group the
    task lacks) must be left without one, as a single shard leaves it, rather than given zeros
    that Adam would count as a step.
    """
    return [float(p.grad is not None) for p in parameters]


def assign_grads(parameters: Sequence[Tensor], flat: Tensor) -> None:
    """Sets each parameter's gradient to its slice of ``flat`` (the inverse of :func:`flatten_grads`)."""
    offset = 0
    for parameter in parameters:
        size = parameter.numel()
        parameter.grad = flat[offset : offset + size].view_as(parameter)
        offset += size

"""Records host synchronisations made during a block on the CPU: the reads that would stop the host until a GPU caught up."""

from __future__ import annotations

import contextlib
import os
import traceback
from typing import Iterator, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators that need a value on the host: a scalar read, or an output whose shape depends on the data.
SYNCING_OPS = frozenset({
    "_local_scalar_dense", "item", "is_nonzero", "equal", "allclose",
    "nonzero", "nonzero_numpy", "argwhere", "masked_select", "bincount", "histc",
    "_unique", "_unique2", "unique_dim", "unique_consecutive", "unique_dim_consecutive",
})
# Python-level reads (the operators above also catch those made inside torch's C++). Not ``.numpy()``:
# on a device tensor it raises, so a sync needs a ``.cpu()`` first, which is counted.
TENSOR_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__", "cpu", "__repr__", "__format__")
_HERE = os.path.abspath(__file__)
_REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_TORCH = os.path.dirname(os.path.abspath(torch.__file__))
_PLUMBING = (os.path.join("torch", "_dynamo"), os.path.join("torch", "_compile.py"), os.path.join("torch", "utils", "_python_dispatch.py"))


class HostRead(NamedTuple):
    """One host read: what it was, the innermost line of the repository that led to it, and whether torch made it."""

    what: str
    site: str
    in_torch: str | None  # the innermost torch file on the stack when torch itself made the read, else None

    def __str__(self) -> str:
        return f"{self.what} at {self.site}" + (f" (inside {self.in_torch})" if self.in_torch else "")


def _read(what: str) -> HostRead:
    stack = [frame for frame in traceback.extract_stack()[:-2] if os.path.abspath(frame.filename) != _HERE]
    # The repository's own files: a virtualenv inside the checkout (.venv, as the README makes one) holds torch.
    site = next((f"{os.path.relpath(f.filename, _REPOSITORY)}:{f.lineno} {f.line}" for f in reversed(stack)
                 if f.filename.startswith(_REPOSITORY) and not f.filename.startswith(_TORCH)
                 and "site-packages" not in f.filename), "?")
    # torch's own plumbing (the dispatch mode's and dynamo's wrappers) is not where a read was made.
    made = [f for f in stack if not any(part in f.filename for part in _PLUMBING)]
    innermost = made[-1].filename if made else ""
    return HostRead(what, site, os.path.relpath(innermost, _TORCH) if innermost.startswith(_TORCH) else None)


def _masks(indices) -> list[torch.Tensor]:
    return [i for i in indices or () if isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)]


class _Recorder(TorchDispatchMode):
    def __init__(self, reads: list[HostRead]):
        super().__init__()
        self.reads = reads

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._overloadpacket.__name__
        if name in SYNCING_OPS:
            self.reads.append(_read(f"aten::{name}"))
        elif func.__name__.startswith("repeat_interleave.Tensor") and kwargs.get("output_size") is None:
            self.reads.append(_read("aten::repeat_interleave without output_size"))
        elif name == "index" and _masks(args[1]):
            self.reads.append(_read("aten::index with a boolean mask"))
        elif name in ("index_put", "index_put_", "_index_put_impl_") and _masks(args[1]):
            # One mask and a one-element value is a masked_fill inside torch, which needs no sync.
            if not (len(_masks(args[1])) == 1 and args[2].numel() == 1):
                self.reads.append(_read(f"aten::{name} with a boolean mask"))
        return func(*args, **kwargs)


@contextlib.contextmanager
def host_syncs() -> Iterator[list[HostRead]]:
    """Records every host read of a tensor made in the block (backward passes run in it included) as :class:`HostRead`s.

    Counted: ``Tensor.item``/``tolist``/``bool``/``float``/``int``/``index`` and printing, ``.cpu()``,
    ``torch.cuda.synchronize``, the operators of :data:`SYNCING_OPS` (also where torch's C++ or a
    ``torch.func`` transform calls them), ``repeat_interleave`` without ``output_size`` and
    boolean-mask indexing. On the CPU every tensor is a host tensor, so a read of one that would be
    on the host on a GPU too (a generator's state) counts alike; device copies cannot be seen.
    """
    reads: list[HostRead] = []
    saved = {name: getattr(torch.Tensor, name) for name in TENSOR_READS}
    saved_synchronize = torch.cuda.synchronize

    def reader(name, original):
        def read(self, *args, **kwargs):
            reads.append(_read(f"Tensor.{name}"))
            return original(self, *args, **kwargs)

        return read

    def synchronize(*args, **kwargs):
        reads.append(_read("torch.cuda.synchronize"))

    try:
        for name, original in saved.items():
            setattr(torch.Tensor, name, reader(name, original))
        torch.cuda.synchronize = synchronize
        with _Recorder(reads):
            yield reads
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)
        torch.cuda.synchronize = saved_synchronize

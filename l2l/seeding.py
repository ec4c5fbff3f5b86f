"""Reproducible random streams: one seeded torch.Generator per purpose; the global RNG only seeded and restored."""

from __future__ import annotations

import contextlib
import hashlib
from typing import Iterator

import torch


def _seed_of(data) -> int:
    """A 63-bit seed from the SHA-256 of ``data`` (bytes or a buffer)."""
    return int.from_bytes(hashlib.sha256(data).digest()[:8], "little") & ((1 << 63) - 1)


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for ``purpose`` derived from ``seed``.

    Different purposes ("train", "validation", "bench", "tune", ...) get unrelated streams
    from the same user seed, so held-out instances never coincide with training instances.
    """
    return _seed_of(f"l2l:{purpose}:{int(seed)}".encode())


def make_generator(seed: int, purpose: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derive_seed(seed, purpose)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, purpose))


def generator_seed(generator: torch.Generator) -> int:
    """A 63-bit seed determined by ``generator``'s current state (which stays on the host, even for CUDA)."""
    return state_seed(generator.get_state())


def state_seed(state: torch.Tensor) -> int:
    """A 63-bit seed determined by a generator state (``Generator.get_state()``'s uint8 tensor)."""
    return _seed_of(state.numpy())


@contextlib.contextmanager
def seeded_random_layers(seed: int | None, device: torch.device) -> Iterator[None]:
    """Runs the block with the global RNG of the CPU and of ``device`` seeded with ``seed``, then
    restores both, so random layers in it are repeatable and leave the global RNG as it was.

    ``seed=None``, or a device other than CPU and CUDA, leaves the global RNG alone.
    """
    if seed is None or device.type not in ("cpu", "cuda"):
        yield
        return
    # Not torch.manual_seed, which would reseed every CUDA device: only the CPU's and the task
    # device's generators are saved, seeded and restored (about 13 us a call on the CPU).
    generators = [torch.default_generator]
    if device.type == "cuda":
        generators.append(torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()])
    saved = [g.get_state() for g in generators]
    try:
        for g in generators:
            g.manual_seed(seed)
        yield
    finally:
        for g, state in zip(generators, saved):
            g.set_state(state)

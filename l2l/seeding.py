"""Reproducible random streams: one seeded torch.Generator per purpose, never the global RNG."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, purpose: str) -> int:
    """A 63-bit seed for ``purpose`` derived from ``seed``.

    Different purposes ("train", "validation", "bench", "tune", ...) get unrelated streams
    from the same user seed, so held-out instances never coincide with training instances.
    """
    digest = hashlib.sha256(f"l2l:{purpose}:{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, purpose: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` seeded with ``derive_seed(seed, purpose)``."""
    return torch.Generator(device=device).manual_seed(derive_seed(seed, purpose))

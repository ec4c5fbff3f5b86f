"""How many compiled variants of the fused backward kernel a set of coordinate counts needs, with and without specialising its loop bounds.

Triton compiles a kernel once per specialisation of its integer arguments (equal to 1, or
divisible by 16). This records real backward launches, one meta-training step at each
coordinate count, with ``kernel_cache.Capture`` (Triton's own binder for sm_90, on the CPU,
nothing run), and counts the distinct specialisations: as the kernel is declared
(``num_blocks`` and ``num_programs`` not specialised) and with every integer specialised.

    python benchmarks/kernel_variants.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
from typing import Iterator

import torch

import kernel_cache
from l2l.kernels import fused
from l2l.optimizers import CoordinateWiseLSTM

SIZE_SETS = {
    "unroll_throughput sizes": [1280, 16_000, 1_000_000, 10_000_000],
    "CUDA tests' backward sizes": [1, 37, 1000, 100_003, 1280, 200_000],
    "every size 1000..1999": list(range(1000, 2000)),
}


def meta_step(n: int) -> None:
    """One fused step and its backward as meta-training launches them (the gradient input needs no gradient)."""
    rule = CoordinateWiseLSTM(seed=0, kernel="fused")
    h, c = (state.requires_grad_() for state in rule.init_state(n))
    update, h_new, c_new = fused.forward(rule, torch.zeros(n), h, c)
    (update.sum() + h_new.sum() + c_new.sum()).backward()


@contextlib.contextmanager
def every_integer_specialised() -> Iterator[None]:
    """Inside the block the backward kernel specialises all its integers, its loop bounds included."""
    kernel = fused.kernels().lstm_backward_kernel
    declared = [param.do_not_specialize for param in kernel.params]
    for param in kernel.params:
        param.do_not_specialize = False
    kernel.device_caches.clear()  # the binder is built from the parameters on first use
    try:
        yield
    finally:
        for param, value in zip(kernel.params, declared):
            param.do_not_specialize = value
        kernel.device_caches.clear()


def stand_in(n: int) -> int:
    """``n``, or above 20,000 a smaller size every backward integer specialises alike on.

    The same remainder mod 256 keeps ``N`` mod 16 and ``num_blocks = ceil(N / 16)`` mod 16, and
    at least 264 blocks keep ``num_programs`` at its cap (2 per SM x 132 SMs).
    """
    return n if n <= 20_000 else 63 * 256 + n % 256


def backward_variants(sizes: list[int]) -> int:
    """Distinct backward-kernel specialisations that meta-training steps at ``sizes`` launch."""
    recorder = kernel_cache.Capture()
    with recorder.active():
        for n in sizes:
            meta_step(stand_in(n))
    return sum(json.loads(variant)["name"].endswith("lstm_backward_kernel") for variant in recorder.variants)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    print(f"Triton {fused.triton_version()}, backward kernel, default FusedConfig, sm_90")
    for name, sizes in SIZE_SETS.items():
        declared = backward_variants(sizes)
        with every_integer_specialised():
            specialised = backward_variants(sizes)
        print(f"  {name:28} variants: {specialised} with the loop bounds specialised, {declared} as declared")


if __name__ == "__main__":
    main()

"""How many compiled variants of the fused backward kernel a set of coordinate counts needs, with and without specialising its loop bounds.

Triton compiles a kernel once per specialisation of its integer arguments (equal to 1, or
divisible by 16). This computes each launch's specialisation with Triton's own binder for
sm_90, on the CPU (no GPU needed), for the integers ``FusedLSTMFunction.backward`` passes at
each coordinate count, and counts the distinct ones: as the kernel is declared (``num_blocks``
and ``num_programs`` not specialised) and with every integer specialised. Uses Triton's
internal ``create_function_from_signature`` (checked on Triton 3.6 and 3.9).

    python benchmarks/kernel_variants.py
"""

from __future__ import annotations

import copy

import torch
from triton.backends.compiler import GPUTarget
from triton.compiler import make_backend
from triton.runtime.jit import create_function_from_signature

from l2l.kernels import fused

HIDDEN, SMS = 20, 132  # the 2 x 20 LSTM; an H100/H200's SM count sizes the persistent grid
SIZE_SETS = {
    "unroll_throughput sizes": [1280, 16_000, 1_000_000, 10_000_000],
    "CUDA tests' backward sizes": [1, 37, 1000, 100_003, 1280, 200_000],
    "every size 1000..1999": list(range(1000, 2000)),
}


def specialisation(binder, n: int) -> str:
    """The specialisation key of one default-config backward launch over ``n`` coordinates."""
    config = fused.get_config()
    pointer = torch.empty(64)  # only the alignment of the data pointers matters (allocations: 256 B)
    blocks = fused.triton_cdiv(n, config.backward_block)
    programs = max(1, min(blocks, config.programs_per_sm * SMS))
    ints = [n, HIDDEN * n, n, HIDDEN * n, n, blocks, programs]  # N, s_l, s_h, gs_l, gs_h, num_blocks, num_programs
    constants = dict(F=2, LOG_SIGN=True, H=HIDDEN, HP=32, L=2, BLOCK=config.backward_block, PRECISION=config.precision,
                     HAS_DU=True, HAS_DH=True, HAS_DC=True, NEED_DG=False, NEED_DSTATE=True, NEED_DW=True,
                     DW_SCRATCH=config.weight_grads == "scratch")
    return str(binder(*[pointer] * 14, *ints, **constants, debug=False)[1])


def main() -> None:
    kernel = fused.kernels().lstm_backward_kernel
    backend = make_backend(GPUTarget("cuda", 90, 32))
    specialised = [copy.copy(param) for param in kernel.params]
    for param in specialised:
        param.do_not_specialize = False
    as_declared = create_function_from_signature(kernel.signature, kernel.params, backend)
    everything = create_function_from_signature(kernel.signature, specialised, backend)
    print(f"Triton {fused.triton_version()}, backward kernel, default FusedConfig, sm_90")
    for name, sizes in SIZE_SETS.items():
        print(f"  {name:28} variants: {len({specialisation(everything, n) for n in sizes})} with the loop bounds "
              f"specialised, {len({specialisation(as_declared, n) for n in sizes})} as declared")


if __name__ == "__main__":
    main()

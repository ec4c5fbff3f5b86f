"""The device the CUDA-marked tests run on, and their skip marks.

``benchmarks/kernel_cache.py`` sets ``L2L_CUDA_TESTS_DEVICE=cpu`` to record, on a machine
without a GPU, which fused-kernel variants these tests launch: under its capture no kernel
runs and the tests' assertions are not judged. Everywhere else the tests run on CUDA or skip.
"""

import os

import pytest
import torch

from l2l.kernels import fused

CUDA = torch.device(os.environ.get("L2L_CUDA_TESTS_DEVICE", "cuda"))
RECORDING = CUDA.type != "cuda"  # the kernel-cache capture, not a test run

needs_cuda = pytest.mark.skipif(not (RECORDING or torch.cuda.is_available()), reason="needs CUDA")
needs_cuda_and_triton = pytest.mark.skipif(
    not (RECORDING or torch.cuda.is_available()) or fused.triton_version() is None, reason="needs CUDA and Triton"
)

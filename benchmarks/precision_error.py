"""Accuracy of the fused kernel's dot precisions (ieee, tf32x3, tf32) against float64 truth, beside PyTorch's float32.

Three measurements per path, each the largest error against the float64 reference path on
the same inputs:
- ``step``: one LSTM step on N coordinates (gradients over 12 decades, with zero, tiny and
  huge entries; random states): update, h and c, relative to ``|truth| + 1``;
- ``gradients``: every gradient of a random linear functional of that step's outputs
  (inputs and weights), relative to the largest entry of the true gradient;
- ``meta-gradient``: the meta-gradient of the paper's quadratic setting (K x 10
  coordinates, a 20-step truncation, first order), relative to its largest entry.

The rows are the reference path in float32 (what the fused kernel is held to), then the
fused kernel at each precision. On CUDA the kernels run compiled. On the CPU they run in
Triton's interpreter with tensor-core rounding emulated (``l2l.kernels.tensor_cores``), slow:
about 3 minutes per precision for the meta-gradient at K = 128.

    python benchmarks/precision_error.py [--device cpu|cuda] [--coordinates 1000] [--instances 128] [--json OUT]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from typing import Iterator

import torch

from l2l.kernels import fused, tensor_cores
from l2l.meta.unroll import start, unroll
from l2l.optimizers import CoordinateWiseLSTM, LSTMState
from l2l.tasks import QuadraticFamily
from l2l.tasks.quadratic import QuadraticTask
from l2l.cli import output_file, positive_int

PATHS = ("reference float32", "fused ieee", "fused tf32x3", "fused tf32")
UNROLL = 20


def step_inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """float64 ``(grad [n], h, c [2, 20, n], weights of the functional)``: gradients log-uniform over 1e-9..1e3."""
    generator = torch.Generator().manual_seed(seed)
    magnitude = 10.0 ** (torch.rand(n, generator=generator, dtype=torch.float64) * 12 - 9)
    grad = magnitude * torch.randn(n, generator=generator, dtype=torch.float64).sign()
    grad[: min(n, 5)] = torch.tensor([0.0, 1e-30, 1e30, -1e30, -1e-30], dtype=torch.float64)[: min(n, 5)]
    shape = (2, 20, n)
    h = torch.randn(shape, generator=generator, dtype=torch.float64) * 0.5
    c = torch.randn(shape, generator=generator, dtype=torch.float64)
    weights = [torch.randn(t.shape, generator=generator, dtype=torch.float64) for t in (grad, h, c)]
    return grad, h, c, weights


@contextlib.contextmanager
def path(name: str, rule: CoordinateWiseLSTM, device: torch.device) -> Iterator[None]:
    """``rule`` set up to run as the named path (kernel, precision; the interpreter off CUDA)."""
    kernel, _, precision = name.partition(" ")
    rule.kernel = kernel
    try:
        with contextlib.ExitStack() as stack:
            if kernel == "fused":
                stack.enter_context(fused.configured(precision=precision))
                if device.type == "cpu":  # larger backward blocks: the interpreter's cost is per block
                    stack.enter_context(fused.configured(backward_block=64))
                    stack.enter_context(fused.interpreter())
                    stack.enter_context(tensor_cores.emulated())
            yield
    finally:
        rule.kernel = "auto"


def step_outputs(rule: CoordinateWiseLSTM, inputs, device: torch.device):
    """``(update, h, c)`` and the gradients of ``sum(w * outputs)`` w.r.t. grad, h, c and the weights, in float64."""
    dtype = next(rule.parameters()).dtype
    grad, h, c = (t.to(device, dtype).requires_grad_() for t in inputs[:3])
    update, state = rule(grad, LSTMState(h, c))
    outputs = (update, state.h, state.c)
    objective = sum((o * w.to(device, dtype)).sum() for o, w in zip(outputs, inputs[3]))
    grads = torch.autograd.grad(objective, [grad, h, c, *rule.parameters()])
    return [o.detach().double().cpu() for o in outputs], [g.double().cpu() for g in grads]


def meta_gradient(rule: CoordinateWiseLSTM, task: QuadraticTask) -> list[torch.Tensor]:
    """The meta-gradient of the summed loss of one 20-step truncation from theta_0, in float64."""
    losses, _ = unroll(rule, task, start(rule, task), UNROLL)
    return [g.double().cpu() for g in torch.autograd.grad(losses.sum(0).mean(), list(rule.parameters()))]


def largest_error(ours: list[torch.Tensor], truth: list[torch.Tensor], relative_to_entries: bool) -> float:
    if relative_to_entries:
        return max(((a - b).abs() / (b.abs() + 1)).max().item() for a, b in zip(ours, truth))
    return max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(ours, truth))


def measure(device: torch.device, coordinates: int, instances: int, paths: tuple[str, ...] = PATHS) -> dict:
    """``{path: {"step", "gradients", "meta_gradient": largest error, "seconds"}}``, printing each row."""
    rule = CoordinateWiseLSTM(seed=21).to(device)
    truth_rule = CoordinateWiseLSTM(seed=21, kernel="reference").double().to(device)
    inputs = step_inputs(coordinates)
    true_outputs, true_grads = step_outputs(truth_rule, inputs, device)
    family_task = QuadraticFamily(dim=10).sample(instances, torch.Generator().manual_seed(0), device)
    true_meta = meta_gradient(truth_rule, QuadraticTask(family_task.W.double(), family_task.y.double()))
    rows = {}
    for name in paths:
        began = time.perf_counter()
        with path(name, rule, device):
            outputs, grads = step_outputs(rule, inputs, device)
            meta = meta_gradient(rule, family_task)
        rows[name] = {"step": largest_error(outputs, true_outputs, True),
                      "gradients": largest_error(grads, true_grads, False),
                      "meta_gradient": largest_error(meta, true_meta, False),
                      "seconds": time.perf_counter() - began}
        print(f"  {name:18s} step {rows[name]['step']:8.1e}   gradients {rows[name]['gradients']:8.1e}   "
              f"meta-gradient {rows[name]['meta_gradient']:8.1e}   ({rows[name]['seconds']:.0f} s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--coordinates", type=positive_int, default=1000, help="coordinates of the single step (default 1000)")
    parser.add_argument("--instances", type=positive_int, default=128, help="quadratics in the meta-gradient (default 128)")
    parser.add_argument("--json", type=output_file, help="write the figures here")
    args = parser.parse_args()
    device = torch.device(args.device)
    reason = fused.unavailable_reason(device) if device.type == "cuda" else fused.interpreter_problem()
    if reason is not None:
        raise SystemExit(f"precision_error: the fused kernel cannot run on {device.type}: {reason}")
    where = "compiled" if device.type == "cuda" else "Triton's interpreter, tensor-core rounding emulated"
    print(f"precision_error on {device.type} ({where}), torch {torch.__version__}, triton {fused.triton_version()}, "
          f"{args.coordinates} coordinates, quadratic {args.instances} x 10, T = {UNROLL}; largest error against float64:")
    rows = measure(device, args.coordinates, args.instances)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.type, "mode": where, "torch": torch.__version__, "triton": fused.triton_version(),
                       "machine": platform.machine(), "coordinates": args.coordinates, "instances": args.instances,
                       "unroll": UNROLL, "rows": rows}, f, indent=1)
        print(f"written to {args.json}")


if __name__ == "__main__":
    main()

"""A/B in one process: the reference LSTM step without autograd (in place) against the tracked step, on evaluation and the drop-in step.

"before" switches ``l2l.kernels.reference``'s untracked path off, so the same code runs the
autograd path's ops; "after" is the default. The two alternate (ABAB, then BABA) and each
workload first checks that both give bit-identical results. Wall and thread (CPU) time are
reported, the latter less sensitive to other jobs on shared cores.

    OMP_NUM_THREADS=1 python benchmarks/untracked_step.py [--workloads quadratic,mnist,dropin1e5] [--repeats 40] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from typing import Callable

import torch
from torch import nn

from l2l import CoordinateWiseLSTM, LearnedOptimizer
from l2l.cli import output_file, positive_int
from l2l.kernels import reference
from l2l.meta.evaluate import evaluate
from l2l.tasks import QuadraticFamily
from l2l.tasks.registry import get_task

UNTRACKED = reference._untracked


def use(after: bool) -> None:
    reference._untracked = UNTRACKED if after else (lambda *args: False)


def workload(name: str, steps: int) -> tuple[Callable[[], object], Callable[[], list[torch.Tensor]]]:
    """``(run once, results to compare)`` for ``quadratic`` (128 x 10), ``mnist`` (4 instances) or ``dropinN`` (N parameters)."""
    if name.startswith("dropin"):
        torch.manual_seed(0)  # the Linear layers initialise from the global RNG: both runs get the same model
        width = round((-1 + math.sqrt(1 + float(name[len("dropin"):]))) / 2)
        model = nn.Sequential(*(nn.Linear(width, width) for _ in range(4)))
        generator = torch.Generator().manual_seed(0)
        for p in model.parameters():
            p.grad = torch.randn(p.shape, generator=generator) * 1e-2
        optimizer = LearnedOptimizer(model.parameters(), CoordinateWiseLSTM(seed=0))

        def results() -> list[torch.Tensor]:
            optimizer.step()
            return [p.detach().clone() for p in model.parameters()] + [
                t.clone() for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]

        return optimizer.step, results
    family = QuadraticFamily(dim=10) if name == "quadratic" else get_task(name)
    task = family.sample(128 if name == "quadratic" else 4, torch.Generator().manual_seed(0))
    rule = CoordinateWiseLSTM(seed=0)

    def once():
        return evaluate(rule, task, steps, seed=1)

    def results() -> list[torch.Tensor]:
        result = once()
        return [result.losses, *result.metrics.values()]

    return once, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="quadratic,mnist,dropin1e5", help="comma-separated: quadratic, mnist, dropinN")
    parser.add_argument("--repeats", type=positive_int, default=40, help="pairs per workload")
    parser.add_argument("--steps", type=positive_int, default=100, help="optimizee steps of an evaluation")
    parser.add_argument("--json", type=output_file)
    args = parser.parse_args()
    report = []
    for name in args.workloads.split(","):
        runs = {}
        for after in (False, True):  # separate rules and optimizers: the drop-in step changes its state
            use(after)
            runs[after] = workload(name, args.steps)
            compared = runs[after][1]()
            runs[after] = (runs[after][0], compared)
        same = len(runs[False][1]) == len(runs[True][1]) and all(map(torch.equal, runs[False][1], runs[True][1]))
        wall, cpu = {False: [], True: []}, {False: [], True: []}
        for pair in range(args.repeats):
            for after in ((False, True) if pair % 2 == 0 else (True, False)):
                use(after)
                begin_wall, begin_cpu = time.perf_counter(), time.thread_time()
                runs[after][0]()
                wall[after].append(time.perf_counter() - begin_wall)
                cpu[after].append(time.thread_time() - begin_cpu)
        use(True)
        row = {"workload": name, "pairs": args.repeats, "bit_identical": same}
        for clock, times in (("wall", wall), ("cpu", cpu)):
            ratios = sorted(b / a for b, a in zip(times[False], times[True]))
            quartile = lambda q: ratios[round(q * (len(ratios) - 1))]  # noqa: E731
            row[clock] = {"before_s": statistics.median(times[False]), "after_s": statistics.median(times[True]),
                          "ratio_median": quartile(0.5), "ratio_q1": quartile(0.25), "ratio_q3": quartile(0.75)}
            print(f"{name:11s} {clock:4s} before {row[clock]['before_s'] * 1e3:9.2f} ms  after {row[clock]['after_s'] * 1e3:9.2f} ms"
                  f"  before/after {quartile(0.5):.3f} (quartiles {quartile(0.25):.3f}-{quartile(0.75):.3f})"
                  f"  bit-identical: {same}")
        report.append(row)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": report}, handle, indent=1)


if __name__ == "__main__":
    main()

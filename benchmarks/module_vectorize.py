"""Loss + gradient of K module instances per optimizee step: vmap over the instances versus a loop.

`ModuleTask(vectorize="auto")` loops over the instances for conv nets on the CPU and vmaps
everything else; this prints the figures behind that choice (median seconds per
`value_and_grad`, same parameters and minibatch for both).

    L2L_DATA=../shared/data python benchmarks/module_vectorize.py [--device cpu|cuda] [--threads 1] [--settings mnist:4,...] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from l2l.meta.unroll import value_and_grad
from l2l.tasks import get_task
from l2l.cli import device_arg, output_file, positive_int

SETTINGS = (("mnist", 4), ("mnist", 16), ("cifar10", 1), ("cifar10", 4))


def settings(text: str) -> list[tuple[str, int]]:
    """``"mnist:4,cifar10:1"`` as ``[("mnist", 4), ("cifar10", 1)]``."""
    pairs = []
    for item in text.split(","):
        name, _, count = item.strip().partition(":")
        if not name or not count.isdigit() or int(count) < 1:
            raise argparse.ArgumentTypeError(f"settings are TASK:K with K >= 1, comma-separated; got {item!r}")
        pairs.append((name, int(count)))
    return pairs


def seconds_per_step(task, params, batch, device, repeats: int) -> float:
    value_and_grad(task, params, batch)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        value_and_grad(task, params, batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=device_arg, default="cpu")
    parser.add_argument("--threads", type=positive_int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--settings", type=settings, default=list(SETTINGS),
                        help="task:instances pairs, comma-separated (default: "
                             + ",".join(f"{name}:{k}" for name, k in SETTINGS) + ")")
    parser.add_argument("--json", type=output_file, help="write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    print(f"loss + gradient of K instances per step ({device}, {args.threads} threads, torch {torch.__version__})")
    print(f"{'task':>8} {'K':>3} {'vmap':>10} {'loop':>10} {'vmap / loop':>12}")
    for name, instances in args.settings:
        family = get_task(name)
        figures = {}
        for vectorize in ("vmap", "loop"):
            family.vectorize = vectorize
            task = family.sample(instances, torch.Generator().manual_seed(0), device)
            batch = task.sample_batch(torch.Generator(device=device).manual_seed(1))
            figures[vectorize] = seconds_per_step(task, task.init_params(), batch, device, args.repeats)
        rows.append({"task": name, "instances": instances, **figures, "ratio": figures["vmap"] / figures["loop"]})
        print(f"{name:>8} {instances:>3} {figures['vmap'] * 1e3:>8.1f}ms {figures['loop'] * 1e3:>8.1f}ms {rows[-1]['ratio']:>11.2f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": str(device), "threads": args.threads, "torch": torch.__version__, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()

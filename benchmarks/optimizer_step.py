"""Step time of l2l.LearnedOptimizer versus torch.optim.Adam (foreach; fused on CUDA) on 1e5-1e7 parameters.

The model is four square Linear layers sized to the parameter count; gradients are synthetic
(set once on .grad), so only ``optimizer.step()`` is timed: median over repeats after a warm-up
step. The LSTM's weights do not change its cost, so a freshly initialised one stands in for a
checkpoint.

    python benchmarks/optimizer_step.py [--device cpu|cuda] [--sizes 1e5,1e6,1e7] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from torch import nn

from l2l import CoordinateWiseLSTM, LearnedOptimizer
from l2l.checkpoint import atomic_write
from l2l.cli import output_file, positive_int, positive_int_list


def make_model(num_params: int, device: torch.device) -> nn.Module:
    """Four Linear(w, w) layers with 4 (w^2 + w) close to ``num_params``, with random gradients."""
    width = round((-1 + math.sqrt(1 + num_params)) / 2)
    model = nn.Sequential(*(nn.Linear(width, width) for _ in range(4))).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, device=device, generator=generator) * 1e-2
    return model


def median_step_seconds(optimizer: torch.optim.Optimizer, repeats: int, device: torch.device) -> float:
    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    optimizer.step()  # Warm-up: lazy state, allocator, kernels.
    times = []
    for _ in range(repeats):
        synchronize()
        begin = time.perf_counter()
        optimizer.step()
        synchronize()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--sizes", type=positive_int_list, default="1e5,1e6,1e7", help="parameter counts, comma-separated")
    parser.add_argument("--repeats", type=positive_int_list, default="20,7,3", help="timed steps per size (one value or one per size)")
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--chunk-size", type=positive_int, help="default: the optimizer's (2**14 on CPU, 2**20 on CUDA)")
    parser.add_argument("--state-dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--json", type=output_file)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes, repeats = args.sizes, args.repeats
    if len(repeats) not in (1, len(sizes)):
        parser.error(f"argument --repeats: {len(repeats)} values for {len(sizes)} --sizes; give one, or one per size")
    repeats = repeats * len(sizes) if len(repeats) == 1 else repeats
    rule = CoordinateWiseLSTM(seed=0).to(device)
    state_dtype = getattr(torch, args.state_dtype)
    rows = []
    where = f"{args.threads} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"optimizer.step() on {args.device} ({where}), torch {torch.__version__}, LSTM 2 x 20, "
          f"state {args.state_dtype}, chunk {args.chunk_size or 'default'}; median step time")
    fused = device.type == "cuda"
    header = f"{'params':>11} {'Adam foreach':>13}" + (f" {'Adam fused':>11}" if fused else "")
    print(header + f" {'Learned':>10} {'/foreach':>9}" + (f" {'/fused':>7}" if fused else ""), flush=True)
    for size, count in zip(sizes, repeats):
        model = make_model(size, device)
        params = list(model.parameters())
        row = {"params": sum(p.numel() for p in params)}
        row["adam_foreach_s"] = median_step_seconds(torch.optim.Adam(params, lr=1e-3, foreach=True), count, device)
        if device.type == "cuda":
            row["adam_fused_s"] = median_step_seconds(torch.optim.Adam(params, lr=1e-3, fused=True), count, device)
        learned = LearnedOptimizer(params, rule, chunk_size=args.chunk_size, state_dtype=state_dtype)
        row["learned_s"] = median_step_seconds(learned, count, device)
        row["ratio_foreach"] = row["learned_s"] / row["adam_foreach_s"]
        if "adam_fused_s" in row:
            row["ratio_fused"] = row["learned_s"] / row["adam_fused_s"]
        rows.append(row)
        del learned, model, params
        # Each size printed and saved as soon as it is measured: the GPU session runs this under
        # what is left of its time budget, and a kill during the next size keeps this one.
        line = f"{row['params']:>11,} {row['adam_foreach_s'] * 1e3:>10.2f} ms"
        line += f" {row['adam_fused_s'] * 1e3:>8.2f} ms" if fused else ""
        line += f" {row['learned_s'] * 1e3:>7.1f} ms {row['ratio_foreach']:>8.0f}x"
        line += f" {row['ratio_fused']:>6.0f}x" if fused else ""
        print(line, flush=True)
        if args.json:
            text = json.dumps({"device": args.device, "threads": args.threads, "torch": str(torch.__version__),
                               "chunk_size": args.chunk_size, "state_dtype": args.state_dtype, "rows": rows}, indent=1)
            atomic_write(args.json, lambda handle: handle.write(text.encode()))


if __name__ == "__main__":
    main()

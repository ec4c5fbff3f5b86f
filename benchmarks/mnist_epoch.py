"""Meta-training cost of the MNIST family: seconds and peak memory per epoch (100 steps, unroll 20).

Each configuration runs in its own process so that peak memory is its own.

    L2L_THREADS=2 python benchmarks/mnist_epoch.py [--device cpu|cuda] [--instances 1,4,16] [--epochs 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from l2l.cli import device_arg, output_file, positive_int, positive_int_list

THREADS_ENV = "L2L_THREADS"  # torch threads of each measuring process; an environment variable, as in RESULTS.md's command
DEFAULT_THREADS = 2


def measure(device: str, instances: int, epochs: int) -> dict:
    import torch

    from l2l.config import TrainConfig
    from l2l.meta.train import MetaTrainer

    torch.set_num_threads(positive_int(os.environ.get(THREADS_ENV, str(DEFAULT_THREADS))))
    trainer = MetaTrainer(TrainConfig(task="mnist", instances=instances, epochs=epochs + 1, val_problems=1, device=device))
    # Before the first epoch: the dataset is loaded, nothing of an epoch is allocated yet, so the
    # peak's growth from here is what meta-training itself needs.
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainer.train_epoch()  # warm-up: data on the device, allocator primed
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(epochs):
        begin = time.perf_counter()
        trainer.train_epoch().item()
        times.append(time.perf_counter() - begin)
    coordinates = instances * trainer.validation_task.num_params
    result = {"instances": instances, "coordinates": coordinates, "optimizee_steps": trainer.steps, "unroll": trainer.unroll,
              "seconds_per_epoch": statistics.median(times)}
    if device.startswith("cuda"):
        result["peak_bytes"] = torch.cuda.max_memory_allocated() - base
        result["machine"] = torch.cuda.get_device_name()
    else:
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        result["peak_rss_growth_bytes"] = result["peak_rss_bytes"] - rss_before
        result["machine"] = f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
    result["coordinate_steps_per_second"] = coordinates * trainer.steps / result["seconds_per_epoch"]
    # What the epoch holds is one truncation's graph: per coordinate-step of that truncation.
    growth = result["peak_bytes"] if device.startswith("cuda") else result["peak_rss_growth_bytes"]
    result["bytes_per_coordinate_step"] = growth / (coordinates * trainer.unroll)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=f"environment: {THREADS_ENV}=N sets the torch threads of each measuring process (default: {DEFAULT_THREADS}); "
        "the CPU figures in benchmarks/RESULTS.md were measured with 1",
    )
    parser.add_argument("--device", type=device_arg, default="cpu")
    parser.add_argument("--instances", type=positive_int_list, default="1,4,16", help="K, one process each, comma-separated")
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--json", type=output_file)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    try:  # checked here: each child would fail only after loading the dataset
        positive_int(os.environ.get(THREADS_ENV, str(DEFAULT_THREADS)))
    except argparse.ArgumentTypeError as error:
        parser.error(f"{THREADS_ENV}: {error}")
    if args.child:
        (instances,) = args.instances  # the parent passes one K
        print(json.dumps(measure(args.device, instances, args.epochs)))
        return
    rows = []
    for instances in args.instances:
        done = subprocess.run(
            [sys.executable, __file__, "--child", "--device", args.device, "--instances", str(instances), "--epochs", str(args.epochs)],
            capture_output=True, text=True,
        )
        if done.returncode:
            sys.exit(f"K = {instances} failed (exit status {done.returncode}):\n{done.stderr.strip()[-4000:]}")
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    memory_key = "peak_bytes" if args.device.startswith("cuda") else "peak_rss_bytes"
    print(f"MNIST meta-training epoch ({rows[0]['optimizee_steps']} steps, unroll {rows[0]['unroll']}) on {rows[0]['machine']}")
    growth_key = "peak_bytes" if args.device.startswith("cuda") else "peak_rss_growth_bytes"
    print(f"{'K':>4} {'coordinates':>12} {'s/epoch':>9} {'coord-steps/s':>14} {'peak memory':>12} {'of which the epoch':>19} "
          f"{'per coord-step':>15}")
    for row in rows:
        print(f"{row['instances']:>4} {row['coordinates']:>12,} {row['seconds_per_epoch']:>9.2f} "
              f"{row['coordinate_steps_per_second']:>14.3g} {row[memory_key] / 2**30:>8.2f} GiB {row[growth_key] / 2**20:>15.0f} MiB "
              f"{row['bytes_per_coordinate_step'] / 1e3:>12.1f} KB")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()

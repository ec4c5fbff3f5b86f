"""Sharded meta-training side by side: seconds per epoch and peak memory of one process, accumulation, and torchrun.

Every configuration trains the same meta-batch (the family's default instances per epoch) in its
own processes, so its peak memory is its own:

- ``1 process``: the plain run, ``--threads`` threads;
- ``accumulate A``: one process backpropagating A shards one after another;
- ``P processes``: ``torchrun --nproc-per-node P``, one shard each, ``threads / P`` threads each.

    python benchmarks/distributed_training.py [--tasks quadratic,mnist] [--device cpu] [--processes 2]
        [--accumulate 2,4] [--threads 2] [--epochs 3] [--json OUT]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from l2l.cli import device_arg, output_file, positive_int, positive_int_list, task_list


def worker(task: str, device: str, accumulate: int, epochs: int, threads: int, out: str) -> None:
    """Times ``epochs`` epochs after one warm-up in this process (one rank when under torchrun); appends a JSON line."""
    import torch
    import torch.distributed as dist

    from l2l.config import TrainConfig
    from l2l.meta.distributed import process_group_from_environment
    from l2l.meta.evaluate import resolve_device
    from l2l.meta.train import MetaTrainer

    torch.set_num_threads(threads)
    with process_group_from_environment(resolve_device(device)) as distributed:
        trainer = MetaTrainer(TrainConfig(task=task, accumulate=accumulate, epochs=epochs + 1, val_problems=1, device=device))
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        trainer.train_epoch().item()  # warm-up
        times = []
        for _ in range(epochs):
            if distributed:
                dist.barrier()
            begin = time.perf_counter()
            trainer.train_epoch().item()  # .item(): every process has the averaged meta-loss
            times.append(time.perf_counter() - begin)
        record = {
            "rank": trainer.layout.rank,
            "seconds_per_epoch": statistics.median(times),
            "peak_rss_growth_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before,
            "instances": trainer.instances,
            "coordinates": trainer.instances * trainer.validation_task.num_params,
            "optimizee_steps": trainer.steps,
        }
    with open(out, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def launch(task: str, device: str, processes: int, accumulate: int, threads: int, epochs: int) -> dict:
    """Runs one configuration in fresh processes; returns its figures (the slowest rank's time, the largest memory)."""
    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "records.jsonl")
        per_process = max(1, threads // processes)
        arguments = ["--worker", task, device, str(accumulate), str(epochs), str(per_process), out]
        environment = {**os.environ, "OMP_NUM_THREADS": str(per_process)}
        if processes == 1:
            command = [sys.executable, os.path.abspath(__file__), *arguments]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes),
                       os.path.abspath(__file__), *arguments]
        done = subprocess.run(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if done.returncode:
            sys.exit(f"{task}, {processes} process(es) x accumulate {accumulate} failed (exit status {done.returncode}):\n"
                     f"{done.stderr.strip()[-4000:]}")
        with open(out) as handle:
            records = [json.loads(line) for line in handle]
    assert len(records) == processes, records
    seconds = max(record["seconds_per_epoch"] for record in records)
    first = records[0]
    return {
        "task": task,
        "processes": processes,
        "accumulate": accumulate,
        "threads_per_process": per_process,
        "instances": first["instances"],
        "seconds_per_epoch": seconds,
        "coordinate_steps_per_second": first["coordinates"] * first["optimizee_steps"] / seconds,
        "peak_rss_growth_bytes_per_process": max(record["peak_rss_growth_bytes"] for record in records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=task_list, default="quadratic,mnist", help="comma-separated task families (see `l2l tasks`)")
    parser.add_argument("--device", type=device_arg, default="cpu")
    parser.add_argument("--processes", type=positive_int, default=2)
    parser.add_argument("--accumulate", type=functools.partial(positive_int_list, empty=True), default="2,4",
                        help="shards of the one-process runs with accumulation, comma-separated ('' for none)")
    parser.add_argument("--threads", type=positive_int, default=2, help="threads of the one-process runs, shared by the P processes")
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--json", type=output_file)
    args = parser.parse_args()
    layouts = [(1, 1), *((1, a) for a in args.accumulate), (args.processes, 1)]
    rows = []
    for task in args.tasks:
        for processes, accumulate in layouts:
            row = launch(task, args.device, processes, accumulate, args.threads, args.epochs)
            baseline = next((r for r in rows if r["task"] == task), row)  # the task's one-process run comes first
            row["speed_vs_one_process"] = baseline["seconds_per_epoch"] / row["seconds_per_epoch"]
            row["memory_vs_one_process"] = row["peak_rss_growth_bytes_per_process"] / baseline["peak_rss_growth_bytes_per_process"]
            rows.append(row)
            print(
                f"{task:10s} {processes} process(es) x accumulate {accumulate} ({row['threads_per_process']} threads each), "
                f"{row['instances']} instances: {row['seconds_per_epoch']:.3f} s/epoch ({row['speed_vs_one_process']:.2f}x), "
                f"peak memory growth {row['peak_rss_growth_bytes_per_process'] / 2**20:.0f} MiB per process "
                f"({row['memory_vs_one_process']:.2f}x)",
                flush=True,
            )
    if args.json:
        import torch

        report = {
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores" if args.device == "cpu" else args.device,
            "torch": torch.__version__,
            "command": " ".join(["python", "benchmarks/distributed_training.py", *sys.argv[1:]]),
            "rows": rows,
        }
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
        print(f"written to {args.json}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        task, device, accumulate, epochs, threads, out = sys.argv[2:]
        worker(task, device, int(accumulate), int(epochs), int(threads), out)
    else:
        main()

"""Times CPU meta-training of two source trees side by side: one worker process per tree, units alternated.

Each worker imports l2l from its tree (``PYTHONPATH``) and runs one unit of ``MetaTrainer``'s
eager path on the quick start's setting per request: a truncation (20 steps unrolled,
backward, clipping, Adam) or a whole epoch. The units alternate between the workers in ABBA
order, so a machine shared with other jobs slows both alike; the figure to read is the median
of the paired ratios (base time / new time of adjacent units).

    python benchmarks/compare_trees.py --base ../main-at-start --new . [--pairs 300] [--threads 1]
                                       [--unit truncation|epoch] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable


def build_unit(unit: str, instances: int, dim: int) -> Callable[[], None]:
    """One unit of meta-training as ``l2l train --task quadratic`` runs it (seed 0), warmed up."""
    from l2l.config import TrainConfig
    from l2l.meta.train import MetaTrainer
    from l2l.meta.unroll import start

    trainer = MetaTrainer(TrainConfig(task="quadratic", task_options={"dim": dim}, instances=instances, seed=0), None)
    if unit == "epoch":
        run = trainer.train_epoch
    else:
        task = trainer.family.sample(trainer.instances, trainer.instance_generator, trainer.device)
        truncate = trainer._eager_truncation([task])
        carries = [start(trainer.rule, task)]

        def run() -> None:
            nonlocal carries
            _, carries = truncate(carries, trainer.unroll)

    for _ in range(2):
        run()
    return run


def worker(args: argparse.Namespace) -> None:
    """Serves ``go`` lines on stdin: runs one unit per line and prints its wall seconds."""
    import torch

    import l2l

    torch.set_num_threads(args.threads)
    run = build_unit(args.unit, args.instances, args.dim)
    print(json.dumps({"l2l": str(Path(l2l.__file__).resolve()), "torch": torch.__version__}), flush=True)
    for _ in sys.stdin:
        begin = time.perf_counter()
        run()
        print(time.perf_counter() - begin, flush=True)


def summarize(base: list[float], new: list[float]) -> dict[str, float]:
    """Medians of both, their ratio, and the median and quartiles of the paired ratios base / new."""
    ratios = [b / n for b, n in zip(base, new, strict=True)]
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "base_median_s": statistics.median(base),
        "new_median_s": statistics.median(new),
        "ratio_of_medians": statistics.median(base) / statistics.median(new),
        "median_paired_ratio": statistics.median(ratios),
        "paired_ratio_q1": quartiles[0],
        "paired_ratio_q3": quartiles[2],
    }


def spawn(tree: Path, args: argparse.Namespace, cwd: str) -> tuple[subprocess.Popen, dict]:
    """A worker importing l2l from ``tree``; refuses one that imported l2l from elsewhere."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--unit", args.unit, "--threads", str(args.threads),
               "--instances", str(args.instances), "--dim", str(args.dim)]
    process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    if not line:
        raise SystemExit(f"the worker for {tree} failed to start (its error is above)")
    info = json.loads(line)
    try:
        check_imported_from(tree, info)
    except SystemExit:
        process.kill()
        raise
    return process, info


def check_imported_from(tree: Path, info: dict) -> None:
    """Exits with a message unless the worker's l2l (``info["l2l"]``) lies in ``tree``."""
    if not Path(info["l2l"]).is_relative_to(tree):
        raise SystemExit(f"the worker for {tree} imported l2l from {info['l2l']}; give the root of a source tree")


def main() -> None:
    if "--worker" in sys.argv[1:]:
        # A worker imports l2l from the tree it times, which may predate l2l.cli's argument types; the
        # parent checked the values it passes on.
        count: Callable[[str], int] = int
        path: Callable[[str], Path] = Path
        output: Callable[[str], Path] = Path
    else:
        from l2l.cli import output_file as output
        from l2l.cli import path_arg as path
        from l2l.cli import positive_int as count
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=path, help="root of the tree timed first in each pair (its l2l/ is imported)")
    parser.add_argument("--new", type=path, help="root of the other tree")
    parser.add_argument("--pairs", type=count, default=300)
    parser.add_argument("--threads", type=count, default=1, help="torch threads in each worker")
    parser.add_argument("--unit", choices=("truncation", "epoch"), default="truncation")
    parser.add_argument("--instances", type=count, default=128, help="K (the quick start's: 128)")
    parser.add_argument("--dim", type=count, default=10, help="quadratic dimension (the quick start's: 10)")
    parser.add_argument("--json", type=output, help="write the figures here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.base is None or args.new is None:
        parser.error("--base and --new are required")
    trees = {"base": args.base.resolve(), "new": args.new.resolve()}
    with tempfile.TemporaryDirectory() as cwd:  # not a tree's root, whose l2l/ would shadow PYTHONPATH
        workers = {name: spawn(tree, args, cwd) for name, tree in trees.items()}
        times: dict[str, list[float]] = {"base": [], "new": []}
        loads = []
        for pair in range(args.pairs):
            for name in ("base", "new") if pair % 2 == 0 else ("new", "base"):
                process = workers[name][0]
                process.stdin.write("go\n")
                process.stdin.flush()
                times[name].append(float(process.stdout.readline()))
            loads.append(os.getloadavg()[0])
        for process, _ in workers.values():
            process.stdin.close()
            process.wait()
    figures = summarize(times["base"], times["new"])
    load = {"min": min(loads), "median": statistics.median(loads), "max": max(loads)}
    print(f"{args.unit} of quadratic meta-training ({args.instances} x {args.dim} coordinates), {args.threads} thread(s), "
          f"{args.pairs} alternating pairs, {platform.machine()}, {os.cpu_count()} CPUs, "
          f"1-min load {load['min']:.2f}-{load['max']:.2f} (median {load['median']:.2f})")
    for name in ("base", "new"):
        print(f"  {name:4s} {trees[name]}: median {figures[f'{name}_median_s'] * 1e3:8.1f} ms")
    print(f"  base / new: {figures['median_paired_ratio']:.3f}x median paired ratio (quartiles "
          f"{figures['paired_ratio_q1']:.3f}-{figures['paired_ratio_q3']:.3f}), {figures['ratio_of_medians']:.3f}x ratio of medians")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"unit": args.unit, "threads": args.threads, "pairs": args.pairs, "instances": args.instances, "dim": args.dim,
                       "trees": {name: str(tree) for name, tree in trees.items()},
                       "workers": {name: info for name, (_, info) in workers.items()}, "load": load, **figures,
                       "seconds": times}, handle, indent=1)


if __name__ == "__main__":
    main()

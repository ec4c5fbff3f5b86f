"""Paper, section 3.3: the CIFAR-10-trained LSTM (separate LSTMs for conv and fully connected layers) on CIFAR-10, -5 and -2."""

import argparse

from _experiment import bench, parse, parser, train
from l2l.cli import baseline_list
from l2l.config import did_you_mean

# The recipe of the shipped checkpoints/cifar10.pt (see checkpoints/README.md). Both LSTMs start
# from the shipped MNIST optimizer (a CPU-sized budget; the paper trained from scratch).
RECIPE = ["--task", "cifar10", "--split", "conv,fc", "--init-from", "mnist", "--instances", "1", "--meta-lr", "3e-3",
          "--meta-lr-schedule", "cosine", "--epochs", "150", "--val-every", "25", "--val-problems", "4", "--checkpoint-every", "5"]
# Conv nets are slow on a CPU: a narrower learning-rate grid (1e-4 ... 1 in half-decades) and
# fewer instances than the MLP experiments.
GRID = ["--lr-grid", "0.0001,0.000316,0.001,0.00316,0.01,0.0316,0.1,0.316,1", "--tune-problems", "4"]
TASKS = ("cifar10", "cifar5", "cifar2")


def tasks(text: str) -> list[str]:
    """argparse type: a comma-separated subset of TASKS, each once.

    Not the shared ``l2l.cli.task_list``: the script evaluates the CIFAR-10-trained optimizer
    (a conv/fc split) with a grid and recipe for the CIFAR conv nets, so only those tasks
    belong here; a misspelt one still gets the nearest.
    """
    chosen = [task.strip() for task in text.split(",") if task.strip()]
    subset = ",".join(TASKS)
    if not chosen:
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {subset}, got {text!r}")
    for task in chosen:
        if task not in TASKS:
            raise argparse.ArgumentTypeError(
                f"{task!r} is not one of this script's tasks{did_you_mean(task, TASKS)}, {subset} (the CIFAR-10-trained optimizer of "
                f"section 3.3); give a comma-separated subset of them, got {text!r}"
            )
    repeated = next((task for task in chosen if chosen.count(task) > 1), None)
    if repeated is not None:
        raise argparse.ArgumentTypeError(f"names {repeated} twice (each writes the same files), got {text!r}")
    return chosen


if __name__ == "__main__":
    args = parser(__doc__, checkpoint="cifar10", problems=8)
    args.add_argument("--tasks", type=tasks, default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    # Published: all five baselines on cifar10, Adam alone on the subsets (benchmarks/RESULTS.md).
    args.add_argument("--baselines", type=baseline_list, default="adam", help="comma-separated baselines for the subsets cifar5, cifar2 (cifar10: all five)")
    options = parse(args, ignore=("tasks",))
    if options.train:
        options.checkpoint = train(options, RECIPE, "paper-cifar10")
    for task in options.tasks:
        baselines = ["--baselines", ",".join(options.baselines)] if task != "cifar10" else []
        bench(options, f"{task}-100", task, steps=100, extra=GRID + baselines)

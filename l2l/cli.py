"""The ``l2l`` command line: ``train``, ``bench`` and ``tasks``. Parses, calls the library, prints."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shlex
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from l2l.checkpoint import CheckpointError, atomic_write, load_use_checkpoint
from l2l.data.base import DATA_ENV, DOWNLOAD_ENV, DataError
from l2l.config import BASELINE_NAMES, DEFAULT_LR_GRID, BenchConfig, ConfigError, TrainConfig, did_you_mean, home_path, json_kind
from l2l.kernels.dispatch import set_kernel
from l2l.meta.distributed import current_layout, process_group_from_environment
from l2l.meta.evaluate import benchmark, format_table, resolve_device
from l2l.meta.stopping import TrainingInterrupted, stop_on_signals
from l2l.meta.train import (BENCH_REPORT, NonFiniteError, RESUME_CHECKPOINT, config_from_resume, make_writable_directory,
                            meta_train, missing_directories, no_finite_validation, remove_empty_directories)
from l2l.tasks.registry import check_task_name, get_task, task_names


# Also the help of the scripts' --data-dir, which they hand on to l2l or resolve as it does.
DATA_DIR_HELP = f"dataset directory (default: ${DATA_ENV} or ~/.cache/l2l/data)"


def _add_data_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", type=path_arg, help=DATA_DIR_HELP)
    parser.add_argument("--download", action="store_true", help="fetch missing dataset files (checksummed; needs internet)")


def _apply_data_flags(args: argparse.Namespace) -> None:
    # Datasets are process-wide settings, not run options: configs and checkpoints stay portable.
    if args.data_dir is not None:
        os.environ[DATA_ENV] = str(args.data_dir)
    if args.download:
        os.environ[DOWNLOAD_ENV] = "1"


def _option_value(raw: str) -> Any:
    """A ``--task-option`` value: JSON (``40``, ``true``, ``null``, ``[1, 2]``), else a number as
    Python reads one (``.5``, ``5.``, ``+2``, ``inf``, which JSON lacks), else the text itself."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        pass
    for number in (int, float):
        try:
            return number(raw)
        except ValueError:
            pass
    return raw


TASK_OPTION_HELP = "option of the task family, VALUE read as JSON or a number (repeatable; `l2l tasks` lists them with their defaults)"


def _task_options(pairs: Sequence[str] | None) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--task-option expects KEY=VALUE, got {pair!r}")
        options[key] = _option_value(raw)
    return options


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: a positive integer (``0``, ``-3``, ``1.5`` and ``x`` are usage errors naming the value)."""
    value = int(text) if text.strip().lstrip("+").isdigit() else 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_int_list(text: str, *, empty: bool = False) -> tuple[int, ...]:
    """argparse type: comma-separated positive integers, such as ``1,4,16`` or ``1e5,1e6``.

    Whole numbers may be written in e-notation (sizes: ``1e7``); ``0``, ``-5``, ``1.5``, ``x``
    and an empty item are usage errors naming the value and the form. ``empty=True`` (through
    ``functools.partial``) lets a blank value stand for no items.
    """
    if empty and not text.strip():
        return ()
    values = tuple(_whole_number(part) for part in text.split(","))
    if not all(value > 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers (such as 1,4,16 or 1e5), got {text!r}")
    return values


def _whole_number(text: str) -> int:
    """``text`` as a whole number, digits or e-notation (``16``, ``1e5``); 0 for anything else (``1.5``, ``x``, ``''``)."""
    if text.strip().lstrip("+").isdigit():
        return int(text)  # exact, however many digits
    try:
        number = float(text)
    except ValueError:
        return 0
    return int(number) if math.isfinite(number) and number.is_integer() else 0


def task_list(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated registered task names, such as ``quadratic,mnist``.

    An unknown name is a usage error naming the nearest registered one and all of them, before
    anything runs; so is a list without a name.
    """
    names = _name_list(text)
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated task names (see `l2l tasks`), got {text!r}")
    for name in names:
        try:
            check_task_name(name)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None
    return names


def path_arg(text: str) -> Path:
    """argparse type: a path, a leading ``~`` the home directory; an empty one (an unset shell variable, say) is a usage error."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return home_path(text)


def file_stem(text: str) -> str:
    """argparse type: a file name without suffix (``tangent_prop``): not empty, no folder, not hidden."""
    if not text.strip() or text != text.strip() or "/" in text or "\\" in text or text.startswith("."):
        raise argparse.ArgumentTypeError(
            f"expected a file name without folder or suffix (such as tangent_prop), got {text!r}"
        )
    return text


def output_file(text: str) -> Path:
    """argparse type: a file to write at the end of a run, checked before it starts (nothing is created).

    An empty path, a directory, or a file whose directory is missing or not writable is a usage
    error: found only at the end, it would lose the run's figures.
    """
    path = path_arg(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a directory; give a file name")
    directory = path.parent
    if not directory.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write {path}: its directory {directory} does not exist; create it or give another path")
    if not os.access(directory, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"cannot write {path}: permission denied; give another path")
    return path


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (``0``, ``-1``, ``nan``, ``inf`` and ``x`` are usage errors naming the value)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def device_arg(text: str) -> str:
    """argparse type: a torch device string (``cpu``, ``cuda``, ``cuda:1``), returned as given.

    A string torch does not read, or CUDA where none is available, is a usage error before anything
    runs (a script that starts worker processes had each of them fail with a traceback).
    """
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a torch device (cpu, cuda, cuda:N, ...), got {text!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} was asked for but CUDA is not available here; use cpu")
    return text


def baseline_list(text: str) -> tuple[str, ...]:
    """argparse type: comma-separated baseline names (``sgd,adam``; ``''`` for none), an unknown one naming the nearest."""
    names = _name_list(text)
    for name in names:
        if name not in BASELINE_NAMES:
            raise argparse.ArgumentTypeError(
                f"unknown baseline {name!r}{did_you_mean(name, BASELINE_NAMES)}; choose from {', '.join(BASELINE_NAMES)}"
            )
    return names


def _read_config_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read --config {path}: {error.strerror or error}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"--config {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a JSON object of TrainConfig fields, found {json_kind(data)}")
    return data


def _loss_weights(text: str) -> str | tuple[float, ...]:
    return text if text in ("uniform", "linear", "final") else _float_list(text)


def _name_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


# What an empty --split or --init-from parses to: "none", overriding a --config file's value (None means "not given").
_CLEARED = object()


def _split(text: str) -> tuple[str, ...] | object:
    return _name_list(text) or _CLEARED


def _init_from(text: str) -> str | object:
    return text if text.strip() else _CLEARED


class _DefaultsFormatter(argparse.HelpFormatter):
    """Appends a flag's default to its help where the help does not state it and there is one to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        hidden = default is None or default is False or default == [] or default == argparse.SUPPRESS
        if "(default" in text or hidden or not action.option_strings:
            return text
        if isinstance(default, (tuple, list)):
            default = ",".join(f"{value:g}" if isinstance(value, float) else str(value) for value in default)
        return f"{text} (default: {default})"


# (flag, TrainConfig field, type, help). Defaults come from TrainConfig; None marks "not given".
_TRAIN_FLAGS = [
    ("--task", "task", str, "task family (see `l2l tasks`)"),
    ("--epochs", "epochs", int, "meta-training epochs; each samples fresh instances"),
    ("--instances", "instances", int, "optimizee instances per epoch, K (default: the family's); under torchrun, "
     "all processes together"),
    ("--accumulate", "accumulate", int, "split each process's instances into this many shards, backpropagated one "
     "after another (less memory, same meta-gradient)"),
    ("--optimizee-steps", "optimizee_steps", int, "optimizee steps per epoch (default: the family's)"),
    ("--unroll", "unroll", int, "steps per truncation of BPTT (default: the family's)"),
    ("--meta-lr", "meta_lr", float, "Adam learning rate of the LSTM"),
    ("--meta-lr-schedule", "meta_lr_schedule", str, "constant | cosine (to a tenth of --meta-lr at the last epoch)"),
    ("--clip-grad-norm", "clip_grad_norm", float, "meta-gradient norm clipping"),
    ("--loss-weights", "loss_weights", _loss_weights, "uniform | linear | final | comma-separated weights per unroll step"),
    ("--hidden-size", "hidden_size", int, "LSTM units per layer"),
    ("--num-layers", "num_layers", int, "LSTM layers"),
    ("--preprocess", "preprocess", str, "gradient preprocessing: log_sign | none"),
    ("--preprocess-p", "preprocess_p", float, "exponent p of the log/sign preprocessing"),
    ("--output-scale", "output_scale", float, "factor on the LSTM output"),
    ("--val-every", "val_every", int, "validate every N epochs"),
    ("--val-problems", "val_problems", int, "held-out validation instances"),
    ("--max-nonfinite", "max_nonfinite", int, "stop after this many non-finite meta-steps in a row"),
    ("--checkpoint-every", "checkpoint_every", int, "write checkpoints every N epochs (and at the epoch where SIGTERM or a first Ctrl-C stops the run)"),
    ("--split", "split", _split, "parameter kinds with their own LSTM, e.g. conv,fc (default: one LSTM for every "
     "parameter; '' for that, over a --config file's split)"),
    ("--init-from", "init_from", _init_from, "start from the weights of a use checkpoint (path or shipped name) instead "
     "of a fresh initialisation ('' for a fresh one, over a --config file's init_from)"),
    ("--seed", "seed", int, "seed of every random stream of the run"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--kernel", "kernel", str, "LSTM step: auto (fused Triton kernel on CUDA where available) | reference | fused"),
    ("--cuda-graphs", "cuda_graphs", str, "replay each truncation from CUDA graphs: auto (on CUDA, for tasks "
     "without minibatches) | on (an error where unsupported) | off"),
]


# The final comparison of l2l train: not the defaults of l2l bench, whose seed 0 would compare on other instances.
_BENCH_PROBLEMS, _BENCH_SEED = 512, 1


def _add_train(subparsers) -> None:
    defaults = TrainConfig()
    parser = subparsers.add_parser(
        "train",
        help="meta-train a learned optimizer, then compare it with tuned baselines",
        description="Meta-train a coordinatewise LSTM optimizer by truncated BPTT. Writes OUT/optimizer.pt (use "
        "checkpoint, best validation weights), OUT/resume.pt and OUT/history.json, then benchmarks the result "
        "against tuned SGD, momentum, NAG, RMSProp and Adam on held-out instances.",
    )
    for flag, name, kind, text in _TRAIN_FLAGS:
        default = getattr(defaults, name)
        shown = "" if "(default:" in text or default is None else f" (default: {default})"  # None: the text says
        parser.add_argument(flag, dest=name, type=kind, default=None, help=text + shown)
    parser.add_argument("--task-option", action="append", metavar="KEY=VALUE", help=TASK_OPTION_HELP)
    parser.add_argument("--second-order", dest="second_order", action=argparse.BooleanOptionalAction, default=None,
                        help="differentiate through the optimizee gradients (default: off, as in the paper; "
                        "--no-second-order overrides a --config file's true)")
    parser.add_argument("--config", type=path_arg, help="TrainConfig JSON file; flags given here override it")
    parser.add_argument("--out", type=path_arg, help="output directory (default: runs/TASK)")
    parser.add_argument("--resume", type=path_arg, metavar="PATH", help="continue from a resume checkpoint (OUT/resume.pt)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the checkpoints of another run in --out, and remove its bench.json (refused otherwise)")
    parser.add_argument("--no-bench", action="store_true", help="skip the comparison with tuned baselines")
    parser.add_argument("--bench-problems", type=positive_int, default=_BENCH_PROBLEMS,
                        help=f"held-out instances of the final comparison (default: {_BENCH_PROBLEMS})")
    parser.add_argument("--bench-seed", type=int, default=_BENCH_SEED, help=f"seed of the final comparison's instances (default: {_BENCH_SEED})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_data_flags(parser)
    parser.set_defaults(handler=_train)


def train_config(args: argparse.Namespace) -> tuple[TrainConfig, Path]:
    """The run ``l2l train`` was asked for and its output directory: flags over ``--config`` over the resumed run.

    Each layer overrides the fields it names; ``task_options`` key by key, so one ``--task-option``
    changes one option of the file's (or the resumed run's) and keeps the others.
    """
    given = {name: getattr(args, name) for _, name, _, _ in _TRAIN_FLAGS if getattr(args, name) is not None}
    given.update({name: None for name, value in given.items() if value is _CLEARED})
    if args.second_order is not None:
        given["second_order"] = args.second_order
    if args.task_option:
        given["task_options"] = _task_options(args.task_option)
    layers = [_read_config_file(args.config), given]
    if args.resume is not None:
        # The file's fields go through the same check as flags: only the resumable ones may differ.
        layers.insert(0, config_from_resume(args.resume).to_dict())
    merged: dict[str, Any] = {}
    for layer in layers:
        options = layer.get("task_options")
        if isinstance(options, dict) and isinstance(merged.get("task_options"), dict):
            layer = {**layer, "task_options": {**merged["task_options"], **options}}
        merged.update(layer)
    config = TrainConfig.from_dict(merged)
    if args.resume is not None:
        return config, args.out or args.resume.parent
    return config, args.out or Path("runs") / config.task


def _train(args: argparse.Namespace) -> int:
    _apply_data_flags(args)
    config, out = train_config(args)
    family = get_task(config.task, **config.task_options)  # a bad task or option fails before OUT is created
    # Under torchrun every process trains its shards; rank 0 alone reports, writes and benchmarks.
    with process_group_from_environment(resolve_device(config.device)):
        layout = current_layout(config.accumulate)
        if layout.is_main:
            processes = f", {layout.world_size} processes" if layout.world_size > 1 else ""
            print(f"l2l train: task {config.task}, {config.epochs} epochs{processes}, output {out}", file=sys.stderr)
        try:
            # SIGTERM (a scheduler's notice before preemption) or a first Ctrl-C stops at the next
            # epoch boundary with the checkpoints written there; a second Ctrl-C stops at once.
            with stop_on_signals(announce=layout.is_main) as stop, warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="no validation score was finite")  # the summary says it
                result = meta_train(config, out, resume=args.resume, progress=not args.quiet,
                                    overwrite=args.overwrite, stop=stop)
        except TrainingInterrupted as stopped:
            if layout.is_main:
                _report_interruption(out, config, args, stopped)
            return 128 + (stopped.signal_number or signal.SIGINT)
        except KeyboardInterrupt:
            if layout.is_main:
                _report_interruption(out, config, args)
            return 130
    if not layout.is_main:
        return 0
    best = (no_finite_validation(config) if result.best_epoch == -1
            else f"best validation loss {result.best_score:.4g} at epoch {result.best_epoch}")
    print(f"trained {result.epochs} epochs; {best}; {result.skipped_steps} non-finite meta-steps skipped")
    print(f"use checkpoint: {result.use_checkpoint}\nresume checkpoint: {result.resume_checkpoint}")
    if stop.requested:
        # Asked to stop during the last epoch: training is complete, the comparison is left out.
        print(f"{stop.reason}: the final comparison is left out; run it with: "
              f"{_bench_command(config, args, result.use_checkpoint, out)}", file=sys.stderr)
        return 128 + (stop.signal_number or signal.SIGINT)
    if args.no_bench:
        return 0
    bench = BenchConfig(
        task=config.task, task_options=config.task_options, optimizers=(str(result.use_checkpoint),),
        steps=config.optimizee_steps, problems=args.bench_problems, seed=args.bench_seed, device=config.device,
        kernel=config.kernel,
    )
    try:
        report = _run_bench(bench, family, {"lstm": set_kernel(result.rule, config.kernel)}, quiet=args.quiet)
    except KeyboardInterrupt:
        print(f"\ninterrupted during the final comparison; training is complete ({result.use_checkpoint}); run it with: "
              f"{_bench_command(config, args, result.use_checkpoint, out)}", file=sys.stderr)
        return 130
    report["optimizers"] = list(bench.optimizers)  # as l2l bench reports them
    report["optimizer_labels"] = {"lstm": bench.optimizers[0]}
    _write_then_print(report, lambda: _write_report(out / BENCH_REPORT, report, "the comparison"))
    print(f"comparison written to {out / BENCH_REPORT}", file=sys.stderr)
    return 0


def _data_flags(args: argparse.Namespace) -> list[str]:
    """The data flags ``args`` was given, as command-line words."""
    return [*(["--data-dir", str(args.data_dir)] if args.data_dir is not None else []), *(["--download"] if args.download else [])]


def _resume_command(resume: Path, args: argparse.Namespace) -> str:
    """The shell command that continues this run from ``resume``, with the flags a checkpoint does not keep."""
    words = ["l2l", "train", "--resume", str(resume)]
    if args.no_bench:
        words.append("--no-bench")
    else:  # = : a negative seed is no flag
        words += [f"--{flag}={value}" for flag, value, default in (("bench-problems", args.bench_problems, _BENCH_PROBLEMS),
                                                                   ("bench-seed", args.bench_seed, _BENCH_SEED)) if value != default]
    words += _data_flags(args) + (["--quiet"] if args.quiet else [])
    return shlex.join(words)


def _bench_command(config: TrainConfig, args: argparse.Namespace, use_checkpoint: Path, out: Path) -> str:
    """The shell command that runs (and writes) the final comparison ``l2l train`` makes of ``use_checkpoint``."""
    words = ["l2l", "bench", "--task", config.task]
    for key, value in sorted(config.task_options.items()):
        words += ["--task-option", f"{key}={_option_value_text(value)}"]
    words += ["--optimizer", str(use_checkpoint)]
    if config.optimizee_steps is not None:
        words += ["--steps", str(config.optimizee_steps)]
    words += [f"--problems={args.bench_problems}", f"--seed={args.bench_seed}"]  # = : a negative seed is no flag
    words += [f"--{name}={value}" for name, value in (("device", config.device), ("kernel", config.kernel)) if value != "auto"]
    words += ["--json", str(out / BENCH_REPORT), *_data_flags(args)] + (["--quiet"] if args.quiet else [])
    return shlex.join(words)


def _report_interruption(out: Path, config: TrainConfig, args: argparse.Namespace,
                         stopped: TrainingInterrupted | None = None) -> None:
    """Says on stderr where an interrupted run stopped and how to continue it (``stopped``: a graceful stop)."""
    resume = out / RESUME_CHECKPOINT
    if stopped is not None and stopped.resume_checkpoint is not None:
        print(f"\n{stopped.reason}: stopped after epoch {stopped.epoch} of {config.epochs} with the checkpoints "
              f"written; continue with: {_resume_command(Path(stopped.resume_checkpoint), args)}", file=sys.stderr)
    elif stopped is None and resume.is_file():
        print(f"\ninterrupted; continue with: {_resume_command(resume, args)}", file=sys.stderr)
    else:
        print(f"\n{stopped.reason if stopped else 'interrupted'} before the first checkpoint (every "
              f"{config.checkpoint_every} epochs): nothing was written; start again", file=sys.stderr)


def _run_bench(config: BenchConfig, family, learned: dict, *, quiet: bool) -> dict:
    device = resolve_device(config.device)
    say = None if quiet else (lambda message: print(f"  {message}", file=sys.stderr))
    return benchmark(
        family, learned, baselines=config.baselines, steps=config.steps or family.default_steps,
        problems=config.problems, tune_problems=config.tune_problems, lr_grid=config.lr_grid,
        seed=config.seed, device=device, progress=say,
    )


def _add_bench(subparsers) -> None:
    defaults = BenchConfig()
    parser = subparsers.add_parser(
        "bench",
        help="compare learned optimizers with tuned hand-designed ones",
        description="Evaluate learned optimizers and SGD, momentum, NAG, RMSProp and Adam (learning rate tuned on a "
        "log grid, on instances separate from the evaluation instances) on the same held-out instances.",
        formatter_class=_DefaultsFormatter,
    )
    parser.add_argument("--task", default=defaults.task, help="task family (see `l2l tasks`)")
    parser.add_argument("--task-option", action="append", metavar="KEY=VALUE", help=TASK_OPTION_HELP)
    parser.add_argument("--optimizer", action="append", default=[], metavar="PATH",
                        help="use checkpoint or shipped name (repeatable); the first is reported as 'lstm'")
    parser.add_argument("--baselines", type=_name_list, default=defaults.baselines,
                        help=f"comma-separated subset of {','.join(BASELINE_NAMES)} ('' for none)")
    parser.add_argument("--steps", type=int, default=None, help="optimizee steps (default: the family's)")
    parser.add_argument("--problems", type=int, default=defaults.problems, help="held-out evaluation instances")
    parser.add_argument("--tune-problems", type=int, default=defaults.tune_problems, help="instances for tuning baseline learning rates")
    parser.add_argument("--lr-grid", type=_float_list, default=DEFAULT_LR_GRID, help="comma-separated learning rates (default: 1e-5 ... 10 in half-decades)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the instances")
    parser.add_argument("--device", default=defaults.device, help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--kernel", default=defaults.kernel,
                        help="LSTM step: auto (fused Triton kernel on CUDA where available) | reference | fused")
    parser.add_argument("--json", type=path_arg, metavar="OUT", help="write the full report as JSON")
    parser.add_argument("--plot", type=path_arg, metavar="PNG", help="draw the mean loss curves; the suffix names the format: .png, .pdf, .svg, ... (needs l2l[plot])")
    parser.add_argument("--quiet", action="store_true", help="no progress messages")
    _add_data_flags(parser)
    parser.set_defaults(handler=_bench)


def _option_text(options: dict[str, Any], keys: Sequence[str]) -> str:
    """``k=v`` pairs as ``--task-option`` takes them (see :func:`_option_value_text`)."""
    return " ".join(f"{key}={_option_value_text(options.get(key))}" for key in keys)


def _option_value_text(value: Any) -> str:
    """``value`` as typed after ``--task-option KEY=``: text as it is where it reads back as itself, else JSON (``null``, ``true``)."""
    if isinstance(value, str) and " " not in value and value.strip() == value and _option_value(value) == value:
        return value
    return json.dumps(value)


def _warn_other_options(name_or_path: Any, task: str, trained: Any, evaluated: dict[str, Any]) -> None:
    """Warns when a checkpoint's task options (its metadata) differ from those it is benchmarked on."""
    if not isinstance(trained, dict):
        return  # a checkpoint that did not record them: nothing to compare
    differing = [key for key in {**trained, **evaluated} if trained.get(key) != evaluated.get(key)]
    if differing:
        flags = " ".join(f"--task-option {_option_text(trained, [key])}" for key in differing)
        print(
            f"warning: {name_or_path} was trained on {task!r} with {_option_text(trained, differing)}, evaluated here "
            f"with {_option_text(evaluated, differing)} (give {flags} to evaluate it on its own task)",
            file=sys.stderr,
        )


def _bench(args: argparse.Namespace) -> int:
    _apply_data_flags(args)
    config = BenchConfig(
        task=args.task, task_options=_task_options(args.task_option), optimizers=tuple(args.optimizer),
        baselines=args.baselines, steps=args.steps, problems=args.problems, tune_problems=args.tune_problems,
        lr_grid=args.lr_grid, seed=args.seed, device=args.device, kernel=args.kernel,
    )
    if not config.optimizers and not config.baselines:
        raise ConfigError("nothing to compare: no --optimizer and --baselines ''; give --optimizer PATH or some baselines")
    family = get_task(config.task, **config.task_options)
    # Before the (long) benchmark: plots need matplotlib and a format it writes, the checkpoints
    # must load, and where the results go must be two writable files.
    if args.json is not None and args.plot is not None and args.json.resolve() == args.plot.resolve():
        raise ConfigError(f"--json and --plot name one file, {args.json}; give two")
    if args.plot is not None:
        if importlib.util.find_spec("matplotlib") is None:
            raise ConfigError("--plot needs matplotlib: pip install 'l2l[plot]' (or leave out --plot)")
        from l2l.plotting import figure_format

        try:
            figure_format(args.plot)
        except ValueError as error:
            raise ConfigError(f"--plot {error}") from None
    learned = {}
    sources = {}
    for index, name_or_path in enumerate(config.optimizers):
        loaded = load_use_checkpoint(name_or_path)
        trained_on = loaded.metadata.get("task")
        if trained_on and trained_on != config.task:  # a warning, so --quiet (progress only) keeps it
            print(f"warning: {name_or_path} was trained on {trained_on!r}, evaluated here on {config.task!r}", file=sys.stderr)
        elif trained_on:
            _warn_other_options(name_or_path, trained_on, loaded.metadata.get("task_options"), family.config())
        label = "lstm" if index == 0 else f"lstm[{Path(str(name_or_path)).stem}]"
        if label in learned:  # two checkpoints with one file name (runs/a/optimizer.pt, runs/b/optimizer.pt)
            label = f"lstm[{Path(str(name_or_path)).stem} #{index + 1}]"
        learned[label] = set_kernel(loaded.rule, config.kernel)
        sources[label] = str(name_or_path)
    outputs = {flag: path for flag, path in (("--json", args.json), ("--plot", args.plot)) if path is not None}
    created = missing_directories(*(path.parent for path in outputs.values()))
    try:
        for flag, path in outputs.items():  # last: it creates their directories
            _check_output_file(flag, path)
        _bench_and_write(config, family, learned, sources, args)
    except BaseException:
        # A benchmark that failed (or was interrupted) before writing leaves no empty directories of its own.
        remove_empty_directories(created)
        raise
    return 0


def _bench_and_write(config: BenchConfig, family, learned: dict, sources: dict, args: argparse.Namespace) -> None:
    """Runs the checked benchmark, writes ``--json`` and ``--plot``, then prints its table."""
    report = _run_bench(config, family, learned, quiet=args.quiet)
    report["optimizers"] = list(config.optimizers)
    report["optimizer_labels"] = sources

    def write_files() -> None:
        if args.json:
            _write_report(args.json, report, "--json")
        if args.plot:
            from l2l.plotting import plot_curves

            try:
                plot_curves(report, args.plot)
            except OSError as error:
                raise ConfigError(f"cannot write --plot {args.plot}: {error.strerror or error}") from None

    _write_then_print(report, write_files)
    # Stderr: `l2l bench ... > table.txt` keeps the table alone.
    if args.json:
        print(f"report written to {args.json}", file=sys.stderr)
    if args.plot:
        print(f"figure written to {args.plot}", file=sys.stderr)


def _write_then_print(report: dict, write_files: Callable[[], None]) -> None:
    """Calls ``write_files``, then prints ``report``'s table, which a failed write prints before its error.

    The files come first so that a reader that goes away (``| head``) cannot lose them; the table
    still reaches the terminal when they cannot be written or drawn (any error), so the results are never lost.
    """
    try:
        write_files()
    except Exception:
        print(format_table(report))
        raise
    print(format_table(report))


def _write_report(path: Path, report: dict, what: str) -> None:
    """Writes ``report`` as JSON to ``path`` atomically; a failed write is a ConfigError naming ``what`` and the cause."""
    text = json.dumps(report, indent=1).encode()
    try:
        atomic_write(path, lambda handle: handle.write(text))
    except OSError as error:
        raise ConfigError(f"cannot write {what} {path}: {error.strerror or error}") from None


def _check_output_file(flag: str, path: Path) -> None:
    """Raises a ConfigError unless ``path`` can be written as a file (its directory is created)."""
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file name")
    make_writable_directory(path.parent, f"the directory of {flag} {path}", f"give another {flag}")


def _add_tasks(subparsers) -> None:
    parser = subparsers.add_parser("tasks", help="list the task families", description="List the registered task families.")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(handler=_tasks)


def _tasks(args: argparse.Namespace) -> int:
    # Each family is built on its own: one that cannot be (a user family with a bad config(), say)
    # is listed with its error and named on stderr (status 1), and the others are still listed.
    rows = []
    for name in task_names():
        try:
            family = get_task(name)
        except Exception as error:  # whatever a user's factory raises: shown, not swallowed (status 1)
            rows.append({"name": name, "error": f"{'' if isinstance(error, ValueError) else type(error).__name__ + ': '}{error}"})
            continue
        rows.append({"name": name, "steps": family.default_steps, "unroll": family.default_unroll,
                     "instances": family.default_instances, "options": family.config(), "description": family.description})
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        width = max(len(row["name"]) for row in rows)
        print(f"{'task'.ljust(width)}  steps  unroll    K  description")
        for row in rows:
            if "error" in row:
                print(f"{row['name'].ljust(width)}  cannot be built: {row['error']}")
                continue
            print(f"{row['name'].ljust(width)}  {row['steps']:>5}  {row['unroll']:>6}  {row['instances']:>3}  {row['description']}")
            for line in _option_lines(row["options"]):
                print(line)
    failed = [row for row in rows if "error" in row]
    for row in failed:
        print(f"l2l tasks: error: task {row['name']!r} cannot be built: {row['error']}", file=sys.stderr)
    return 1 if failed else 0


def _option_lines(options: dict[str, Any], width: int = 100) -> list[str]:
    """``options`` as indented lines of ``KEY=VALUE`` items, each as ``--task-option`` reads it back, wrapped at ``width``."""
    items = [f"{key}={_option_value_text(value)}" for key, value in options.items()] or ["none"]
    lines = ["  options:"]
    for item in items:
        if len(lines[-1]) + 1 + len(item) > width and lines[-1].strip() != "options:":
            lines.append(" " * len("  options:"))
        lines[-1] += " " + item
    return lines


def build_parser() -> argparse.ArgumentParser:
    """The ``l2l`` argument parser."""
    from l2l.version import __version__

    parser = argparse.ArgumentParser(
        prog="l2l", description="Learned optimizers: meta-train, benchmark, list tasks.",
        epilog=f"Errors are one line; {DEBUG_ENV}=1 shows their tracebacks. Environment: {DATA_ENV} (the dataset "
        f"directory), {DOWNLOAD_ENV}=1 (as --download).",
    )
    parser.add_argument("--version", action="version", version=f"l2l {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="{train,bench,tasks}", required=True)
    _add_train(subparsers)
    _add_bench(subparsers)
    _add_tasks(subparsers)
    return parser


DEBUG_ENV = "L2L_DEBUG"


def _subcommand_parser(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The parser of ``l2l COMMAND``."""
    action = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    return action.choices[command]


def _raised_in_l2l(error: BaseException) -> bool:
    """Whether the innermost Python frame of ``error``'s traceback is l2l's own code (a deliberate refusal, say)."""
    frame = error.__traceback__
    while frame is not None and frame.tb_next is not None:
        frame = frame.tb_next
    return frame is not None and Path(frame.tb_frame.f_code.co_filename).resolve().is_relative_to(Path(__file__).resolve().parent)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the command line; returns the exit status.

    An error is one line on stderr: status 2 for l2l's own (bad input, a missing file, a run that
    cannot go on), 1 for any other raised elsewhere (torch, a user's task family, the operating
    system: a full disk), whose line names its type. ``L2L_DEBUG=1`` lets every error through
    with its traceback.
    """
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the subcommand's parser says it, with its usage (the top-level one lists none of its flags)
        _subcommand_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        return args.handler(args)
    except BrokenPipeError:
        # The reader went away (`l2l tasks | head`): stop quietly as other Unix tools do. Stdout is
        # pointed at devnull so that the interpreter's final flush does not raise a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as error:  # a TypeError in a user's family or an OSError is one line too (with the hint)
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        # l2l refuses with these; any other type, even raised in l2l (an AttributeError), is likely a bug.
        refusal = isinstance(error, (ValueError, RuntimeError)) and _raised_in_l2l(error)
        if isinstance(error, (ConfigError, CheckpointError, NonFiniteError, DataError)) or refusal:
            print(f"l2l {args.command}: error: {error}", file=sys.stderr)
            return 2
        print(f"l2l {args.command}: error: {type(error).__name__}: {error} (set {DEBUG_ENV}=1 for the traceback)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # l2l train reports its own, saying how to continue
        print(f"\nl2l {args.command}: interrupted", file=sys.stderr)
        return 130

"""Run configurations (TrainConfig, BenchConfig): validated dataclasses that round-trip through JSON."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOSS_WEIGHTINGS = ("uniform", "linear", "final")
META_LR_SCHEDULES = ("constant", "cosine")
DEFAULT_LR_GRID = tuple(10.0 ** (k / 2) for k in range(-10, 3))  # 1e-5 ... 10 in half-decades
BASELINE_NAMES = ("sgd", "momentum", "nag", "rmsprop", "adam")
CUDA_GRAPHS = ("auto", "on", "off")
KERNEL_NAMES = ("auto", "reference", "fused")  # l2l.kernels.dispatch.KERNELS (not imported: configs stay light)


class ConfigError(ValueError):
    """A configuration value is out of range or of the wrong kind."""


def closest_name(name: str, names) -> str | None:
    """The name in ``names`` nearest to ``name`` (a misspelling, another case, ``_`` for ``-``), or None.

    Names equal once lowercased and stripped of ``-`` and ``_`` come first (``mnist_gp``,
    ``cifar-10``, ``MNIST40``), then :func:`difflib.get_close_matches` on those forms.
    """

    def key(text: str) -> str:
        return text.lower().replace("-", "").replace("_", "")

    by_key = {key(candidate): candidate for candidate in sorted(names)}
    if key(name) in by_key:
        return by_key[key(name)]
    matches = difflib.get_close_matches(key(name), list(by_key), n=1, cutoff=0.6)
    return by_key[matches[0]] if matches else None


def home_path(path: str | os.PathLike) -> Path:
    """``path`` with a leading ``~`` (or ``~user``) as the home directory; an unknown user's left as written.

    The shell leaves the tilde of ``--out=~/run``, a quoted ``"~/run"`` or a config file's path
    alone: unexpanded, it names a folder ``~`` in the working directory.
    """
    return Path(os.path.expanduser(os.fspath(path)))


def did_you_mean(name: str, names) -> str:
    """`` (did you mean 'NAME'?)`` for the name in ``names`` nearest to ``name``, or ``''`` when none is near."""
    suggestion = closest_name(name, names)
    return f" (did you mean {suggestion!r}?)" if suggestion else ""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


_JSON_SCALARS = (type(None), bool, int, float, str)
JSON_DATA = "str, int, float, bool, None, and lists and str-keyed dicts of them"


def options_problem(options: Any, what: str, must: str) -> str | None:
    """What makes ``options`` (task options, named ``what``; ``must``: "what must be") not JSON data, or None.

    Checkpoints and reports record task options as JSON (and checkpoints are read back with
    ``torch.load(weights_only=True)``), so only JSON data of exact types is accepted: a tensor, a
    path, a tuple (read back as a list) or an enum would fail there, or come back as another value.
    """
    if type(options) is not dict or not all(type(key) is str for key in options):
        return f"{must} a dict of option names (str) to values, got {options!r} ({_kind(options)})"
    for option, value in options.items():
        problem = _not_json(value)
        if problem is not None:
            where = "" if problem is value else f" in {value!r}"
            shown = f"the key {problem[0]!r} ({_kind(problem[0])})" if isinstance(problem, _BadKey) else f"{problem!r} ({_kind(problem)})"
            return (f"{what} gives option {option!r} a value JSON cannot hold: {shown}{where}. Checkpoints, reports and "
                    f"--task-option hold the options as JSON: give JSON data ({JSON_DATA}; for example a tensor's "
                    ".tolist(), a path's str(), a list for a tuple)")
    return None


class _BadKey(tuple):
    """A dict key that is not a str, as :func:`_not_json` reports it (a 1-tuple)."""


def _not_json(value: Any) -> Any:
    """The first piece of ``value`` that is not JSON data (a :class:`_BadKey` for a key), or None."""
    if type(value) in _JSON_SCALARS:
        return None
    if type(value) is list:
        return next((bad for bad in map(_not_json, value) if bad is not None), None)
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                return _BadKey((key,))
            bad = _not_json(item)
            if bad is not None:
                return bad
        return None
    return value


def _kind(value: Any) -> str:
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def _check_task_options(options: Any) -> None:
    problem = options_problem(options, "task_options", "task_options must be")
    _require(problem is None, problem or "")


def _positive_int(name: str, value: Any) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0, f"{name} must be a positive integer, got {value!r}")


def _positive_float(name: str, value: Any) -> None:
    _require(
        isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0,
        f"{name} must be a positive finite number, got {value!r}",
    )


def _check_seed(value: Any) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool), f"seed must be an integer, got {value!r}")


def _check_sequence(name: str, value: Any, example: str) -> None:
    _require(isinstance(value, (tuple, list)), f"{name} must be a tuple such as {example}, got {value!r}")


def _check_kernel(value: str) -> None:
    _require(value in KERNEL_NAMES, f"kernel must be one of {', '.join(KERNEL_NAMES)}, got {value!r}")


def lr_key(lr: float) -> str:
    """A learning rate as a key of a benchmark's ``lr_scores``: 6 significant digits (grids must be distinct at them)."""
    return f"{lr:.6g}"


def check_lr_grid(lr_grid: Any) -> None:
    """Raises ConfigError unless ``lr_grid`` is a non-empty sequence of distinct positive finite learning rates."""
    _check_sequence("lr_grid", lr_grid, "(1e-3, 1e-2, 1e-1)")
    _require(len(lr_grid) > 0, "lr_grid must not be empty")
    for lr in lr_grid:
        _positive_float("every learning rate in lr_grid", lr)
    keys = [lr_key(float(lr)) for lr in lr_grid]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    _require(not repeated, f"lr_grid lists {', '.join(repeated)} more than once (to 6 significant digits)")


def check_baselines(baselines: Any) -> None:
    """Raises ConfigError unless ``baselines`` is a sequence of distinct names from ``BASELINE_NAMES``."""
    _check_sequence("baselines", baselines, "('sgd', 'adam')")
    for name in baselines:
        _require(name in BASELINE_NAMES,
                 f"unknown baseline {name!r}{did_you_mean(str(name), BASELINE_NAMES)}; choose from {', '.join(BASELINE_NAMES)}")
    _require(len(set(baselines)) == len(baselines), f"baselines lists one more than once: {','.join(baselines)}")


def _check_device(value: str) -> None:
    _require(
        isinstance(value, str) and (value in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", value) is not None),
        f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}",
    )


def json_kind(value: Any) -> str:
    """What kind of JSON value ``value`` (as ``json.loads`` returns it) is, for error messages: "an array", "null", ..."""
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), f"a {type(value).__name__}")


class _JSONConfig:
    """to_dict/from_dict/JSON for the dataclasses below; unknown keys are errors, not silently dropped."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def _sequences_as_tuples(self) -> None:
        # JSON has no tuples: a list, from JSON or from Python, becomes the tuple every sequence field holds.
        for item in dataclasses.fields(self):
            if item.name != "task_options" and isinstance(getattr(self, item.name), list):
                object.__setattr__(self, item.name, tuple(getattr(self, item.name)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise ConfigError(f"a {cls.__name__} must be a JSON object of its fields, found {json_kind(data)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
        return cls(**data)  # JSON's lists become the fields' tuples in __post_init__

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ConfigError(f"{cls.__name__} JSON is not valid JSON: {error}") from None
        return cls.from_dict(data)


@dataclass(frozen=True)
class TrainConfig(_JSONConfig):
    """Everything that defines a meta-training run. Defaults are the paper's quadratic setting but for preprocessing and output scale (README).

    ``optimizee_steps`` and ``unroll`` default (None) to the task family's own defaults.
    """

    task: str = "quadratic"
    task_options: dict = field(default_factory=dict)
    # Learned optimizer.
    hidden_size: int = 20
    num_layers: int = 2
    preprocess: str = "log_sign"
    preprocess_p: float = 10.0
    output_scale: float = 0.1
    split: tuple | None = None  # parameter kinds with their own LSTM, e.g. ("conv", "fc"); None: one LSTM
    init_from: str | None = None  # use checkpoint (path or shipped name) whose weights start the run
    # Truncated BPTT.
    epochs: int = 1000
    instances: int | None = None  # optimizee instances per epoch (K); None: the family's default
    accumulate: int = 1  # shards of the K instances each process backpropagates one after another per meta-step
    optimizee_steps: int | None = None
    unroll: int | None = None
    loss_weights: str | tuple = "uniform"
    second_order: bool = False
    meta_lr: float = 1e-3
    meta_lr_schedule: str = "constant"  # or "cosine": decays to a tenth of meta_lr over the epochs
    clip_grad_norm: float = 1.0
    # Validation and selection.
    val_every: int = 50
    val_problems: int = 256
    # Robustness, bookkeeping.
    max_nonfinite: int = 10
    checkpoint_every: int = 50
    seed: int = 0
    device: str = "auto"
    kernel: str = "auto"  # LSTM step: auto (fused on CUDA where available) | reference | fused
    cuda_graphs: str = "auto"  # replay each truncation from CUDA graphs: auto (where supported) | on | off

    def __post_init__(self):
        self._sequences_as_tuples()
        _require(isinstance(self.task, str) and self.task, "task must be a non-empty string")
        _check_task_options(self.task_options)
        for name in ("hidden_size", "num_layers", "epochs", "val_every", "val_problems", "max_nonfinite", "checkpoint_every", "accumulate"):
            _positive_int(name, getattr(self, name))
        for name in ("instances", "optimizee_steps", "unroll"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if self.optimizee_steps is not None and self.unroll is not None:
            _require(
                self.unroll <= self.optimizee_steps,
                f"unroll ({self.unroll}) must not exceed optimizee_steps ({self.optimizee_steps})",
            )
        _require(self.preprocess in ("log_sign", "none"), f"preprocess must be 'log_sign' or 'none', got {self.preprocess!r}")
        for name in ("preprocess_p", "output_scale", "meta_lr", "clip_grad_norm"):
            _positive_float(name, getattr(self, name))
        if isinstance(self.loss_weights, str):
            _require(
                self.loss_weights in LOSS_WEIGHTINGS,
                f"loss_weights must be one of {', '.join(LOSS_WEIGHTINGS)} or a list of numbers, got {self.loss_weights!r}",
            )
        else:
            _check_sequence("loss_weights", self.loss_weights, "(1.0, 2.0, ...) or one of " + ", ".join(LOSS_WEIGHTINGS))
            weights = tuple(self.loss_weights)
            _require(
                len(weights) > 0
                and all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0 for w in weights),
                f"loss_weights must be non-negative finite numbers, got {self.loss_weights!r}",
            )
            _require(any(w > 0 for w in weights), "loss_weights must not all be zero: the meta-loss would be 0")
            if self.unroll is not None:
                _require(
                    len(weights) == self.unroll,
                    f"loss_weights has {len(weights)} entries but the unroll has {self.unroll} steps",
                )
        _require(isinstance(self.second_order, bool), "second_order must be true or false")
        _require(
            self.meta_lr_schedule in META_LR_SCHEDULES,
            f"meta_lr_schedule must be one of {', '.join(META_LR_SCHEDULES)}, got {self.meta_lr_schedule!r}",
        )
        if isinstance(self.split, str):  # "conv,fc", as on the command line
            object.__setattr__(self, "split", tuple(kind.strip() for kind in self.split.split(",")))
        if self.split is not None:
            _check_sequence("split", self.split, "('conv', 'fc')")
            _require(
                len(self.split) > 0 and all(isinstance(k, str) and k for k in self.split) and len(set(self.split)) == len(self.split),
                f"split must be distinct parameter kinds such as conv,fc; got {self.split!r}",
            )
        _require(
            self.init_from is None or (isinstance(self.init_from, str) and self.init_from),
            f"init_from must be a checkpoint path or shipped name, got {self.init_from!r}",
        )
        _check_seed(self.seed)
        _check_device(self.device)
        _check_kernel(self.kernel)
        _require(self.cuda_graphs in CUDA_GRAPHS, f"cuda_graphs must be one of {', '.join(CUDA_GRAPHS)}, got {self.cuda_graphs!r}")

    def optimizer_config(self) -> dict[str, Any]:
        """Constructor arguments of the learned optimizer this run trains."""
        return {
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "preprocess": self.preprocess,
            "preprocess_p": self.preprocess_p,
            "output_scale": self.output_scale,
        }


@dataclass(frozen=True)
class BenchConfig(_JSONConfig):
    """A comparison of learned and tuned hand-designed optimizers on held-out instances."""

    task: str = "quadratic"
    task_options: dict = field(default_factory=dict)
    optimizers: tuple = ()  # checkpoint paths or shipped names
    baselines: tuple = BASELINE_NAMES
    steps: int | None = None
    problems: int = 512
    tune_problems: int = 128
    lr_grid: tuple = DEFAULT_LR_GRID
    seed: int = 0
    device: str = "auto"
    kernel: str = "auto"  # LSTM step of the learned optimizers: auto | reference | fused

    def __post_init__(self):
        self._sequences_as_tuples()
        _require(isinstance(self.task, str) and self.task, "task must be a non-empty string")
        _check_task_options(self.task_options)
        if isinstance(self.baselines, str):  # "sgd,adam", as on the command line ("" for none)
            object.__setattr__(self, "baselines", tuple(name.strip() for name in self.baselines.split(",") if name.strip()))
        check_baselines(self.baselines)
        _check_sequence("optimizers", self.optimizers, "('quadratic',) (checkpoint paths or shipped names)")
        for name in self.optimizers:
            _require(isinstance(name, str) and name, f"every optimizer must be a checkpoint path or shipped name, got {name!r}")
        if self.steps is not None:
            _positive_int("steps", self.steps)
        _positive_int("problems", self.problems)
        _positive_int("tune_problems", self.tune_problems)
        check_lr_grid(self.lr_grid)
        _check_seed(self.seed)
        _check_device(self.device)
        _check_kernel(self.kernel)

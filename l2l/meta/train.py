"""Meta-training by truncated backpropagation through time (Andrychowicz et al., 2016, section 2).

Each epoch samples fresh optimizee instances and optimizes them for ``optimizee_steps``
steps, unrolled ``unroll`` steps at a time. After each truncation the meta-loss (weighted
sum of the losses over the truncation, averaged over instances) is backpropagated into the
learned optimizer, whose weights Adam updates; parameters and optimizer state are carried,
detached, into the next truncation. A fixed held-out set selects the best weights. The
instances may be split into shards backpropagated one after another and across the processes
of a torch.distributed group (``l2l.meta.distributed``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from l2l.checkpoint import (
    CheckpointError,
    atomic_write,
    build_rule,
    load_resume_checkpoint,
    load_use_checkpoint,
    resolve_checkpoint,
    rule_spec,
    save_resume_checkpoint,
    save_use_checkpoint,
)
from l2l.config import ConfigError, TrainConfig, home_path
from l2l.kernels.dispatch import kernels_taken, set_kernel
from l2l.meta.distributed import (
    REPORTED,
    Collectives,
    ShardLayout,
    assign_grads,
    current_layout,
    flatten_grads,
    grad_presence,
    local_device,
)
from l2l.meta.evaluate import evaluate, resolve_device
from l2l.meta.graphs import GraphedTruncation, TruncationResult, graph_unsupported_reason, truncation_weights
from l2l.meta.stopping import StopRequest, TrainingInterrupted
from l2l.meta.unroll import UnrollCarry, detach_carry, start, unroll
from l2l.optimizers.grouped import PerGroupRule
from l2l.optimizers.lstm import CoordinateWiseLSTM
from l2l.seeding import derive_seed, make_generator, state_seed
from l2l.tasks.base import TaskFamily
from l2l.tasks.registry import get_task

# One truncation of every shard this process computes: (carries, length) -> (result, next carries).
Truncate = Callable[[list[UnrollCarry], int], tuple[TruncationResult, list[UnrollCarry]]]

USE_CHECKPOINT = "optimizer.pt"
RESUME_CHECKPOINT = "resume.pt"
HISTORY_FILE = "history.json"
BENCH_REPORT = "bench.json"  # l2l train's final comparison, beside the checkpoints it describes

# What a resumed run may change without changing what it computes (the kernel only changes rounding).
# accumulate may change as long as processes x accumulate (the shards of an epoch) stays the same.
RESUMABLE_OVERRIDES = ("epochs", "device", "max_nonfinite", "checkpoint_every", "kernel", "cuda_graphs", "accumulate")


class NonFiniteError(RuntimeError):
    """Meta-training kept producing non-finite losses or meta-gradients."""


class _MissedAllReduce(Exception):
    """This process of a group failed where the others cannot learn of it in the all-reduce they are in or go to next.

    Raised by a truncation that failed before joining its all-reduce (gathering its
    meta-gradients) or after it (clipping, the meta-optimizer's step, recording the step), or
    by averaging the epoch's meta-losses. The epoch's closing
    all-reduce, shaped like a truncation's, meets the others in their next all-reduce,
    whichever it is (this truncation's, the next one's, or the epoch's closing one), and
    tells them of :attr:`error`.
    """

    def __init__(self, error: BaseException, what: str):
        super().__init__(what)
        self.error, self.what = error, what


@dataclass
class TrainResult:
    """The outcome of :func:`meta_train`."""

    rule: nn.Module  # the best learned optimizer by validation score (on the CPU)
    best_score: float  # its validation score: mean loss over the last tenth of the steps on the held-out instances
    best_epoch: int
    epochs: int  # epochs completed
    skipped_steps: int  # meta-steps skipped for non-finite loss or gradient
    history: list[dict[str, Any]] = field(default_factory=list)
    use_checkpoint: Path | None = None
    resume_checkpoint: Path | None = None


def loss_weights(config: TrainConfig, unroll: int) -> Tensor:
    """Weights ``[unroll]`` of the per-step losses in the meta-loss."""
    if config.loss_weights == "uniform":
        return torch.ones(unroll)
    if config.loss_weights == "linear":
        return torch.arange(1, unroll + 1, dtype=torch.float32) / unroll
    if config.loss_weights == "final":
        weights = torch.zeros(unroll)
        weights[-1] = 1.0
        return weights
    weights = torch.tensor(config.loss_weights, dtype=torch.float32)
    if weights.numel() != unroll:
        raise ValueError(f"loss_weights has {weights.numel()} entries but the unroll has {unroll} steps")
    return weights


def loss_weight_table(config: TrainConfig, steps: int, unroll: int) -> Tensor:
    """Weights ``[unroll, unroll]`` of every truncation length: row ``L - 1`` weighs a truncation of ``L`` steps.

    A run whose ``steps`` is not a multiple of ``unroll`` ends with a shorter truncation; the
    named weightings are laid out over its own length (``final`` weighs its last step, not a
    step it never reaches). An explicit list is one weight per step of a full truncation, so
    it needs whole truncations.

    Raises:
        ConfigError: explicit weights with ``steps`` not a multiple of ``unroll``.
    """
    if not isinstance(config.loss_weights, str) and steps % unroll:
        raise ConfigError(
            f"explicit loss_weights give one weight per step of a {unroll}-step truncation, but {steps} optimizee steps "
            f"end with a {steps % unroll}-step one; make optimizee_steps a multiple of unroll or use a named weighting"
        )
    table = torch.zeros(unroll, unroll)
    named = isinstance(config.loss_weights, str)
    for length in range(1, unroll + 1):
        table[length - 1, :length] = loss_weights(config, length if named else unroll)[:length]
    return table


def meta_learning_rate(config: TrainConfig, epoch: int) -> float:
    """The meta-optimizer's learning rate during ``epoch`` (0-based) under ``config.meta_lr_schedule``."""
    if config.meta_lr_schedule == "cosine":
        progress = epoch / max(1, config.epochs - 1)
        return config.meta_lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))
    return config.meta_lr


def horizon(config: TrainConfig, family: TaskFamily) -> tuple[int, int]:
    """``(optimizee_steps, unroll)`` with the family's defaults filled in."""
    steps = config.optimizee_steps or family.default_steps
    length = config.unroll or min(family.default_unroll, steps)
    if length > steps:
        raise ValueError(f"unroll ({length}) must not exceed optimizee_steps ({steps})")
    return steps, length


def shard_streams(seed: int, shard: int, shards: int, device: torch.device) -> tuple[torch.Generator, torch.Generator]:
    """The generators of shard ``shard`` of ``shards``: its instances (CPU) and its minibatches (on ``device``).

    An unsplit run (one shard) keeps the streams of a plain run; shard g of S has its own pair,
    whichever process computes it.
    """
    if shards == 1:
        return make_generator(seed, "train"), make_generator(seed, "train-batches", device)
    name = f"shard {shard} of {shards}"
    return make_generator(seed, f"train:{name}"), make_generator(seed, f"train-batches:{name}", device)


# Bytes of a generator's state by device type: the CPU's Mersenne Twister, CUDA's Philox seed and offset.
GENERATOR_STATE_BYTES = {"cpu": torch.Generator().get_state().numel(), "cuda": 16}


def continue_stream(generator: torch.Generator, state: Tensor) -> None:
    """Continues a saved random stream in ``generator``, which may be of another device type than the saved one.

    A state saved from a generator of the same type is set as it is (the stream continues bit for
    bit). One of the other device type (a run trained on a GPU resumed on the CPU, or the reverse)
    cannot be set, and the two types draw different numbers from any seed anyway: ``generator`` is
    seeded from the saved state instead, so the continuation is still determined by the checkpoint.

    Raises:
        RuntimeError: ``state`` is of neither type's size (a damaged state).
    """
    size = state.numel()
    if size != generator.get_state().numel() and size in GENERATOR_STATE_BYTES.values():
        generator.manual_seed(state_seed(state))
    else:
        generator.set_state(state)


def build_learned_rule(config: TrainConfig) -> nn.Module:
    """A freshly initialised learned rule for ``config``: one LSTM, or one per group of ``config.split``."""
    if config.split is None:
        return CoordinateWiseLSTM(**config.optimizer_config(), seed=derive_seed(config.seed, "init"))
    return PerGroupRule(
        {kind: CoordinateWiseLSTM(**config.optimizer_config(), seed=derive_seed(config.seed, f"init-{kind}")) for kind in config.split}
    )


def initialise_from(rule: nn.Module, name_or_path: str) -> nn.Module:
    """Loads the weights of a use checkpoint into ``rule`` (a warm start), in place.

    The checkpoint's optimizer must have ``rule``'s architecture. A single LSTM may also start
    every group of a per-group rule (for example an MNIST optimizer starting the conv and fc
    LSTMs of a CIFAR run).

    Raises:
        ConfigError: the architectures differ (the message shows both).
        CheckpointError: the checkpoint is missing, corrupt or not a use checkpoint.
    """
    source = load_use_checkpoint(name_or_path).rule
    wanted, found = rule_spec(rule), rule_spec(source)
    if wanted == found:
        rule.load_state_dict(source.state_dict())
        return rule
    if isinstance(rule, PerGroupRule) and isinstance(source, CoordinateWiseLSTM):
        if all(rule_spec(member) == found for member in rule.rules.values()):
            for member in rule.rules.values():
                member.load_state_dict(source.state_dict())
            return rule
    raise ConfigError(
        f"init_from {name_or_path!r} holds a {found['class']} with config {found['config']}, but this run trains a "
        f"{wanted['class']} with config {wanted['config']}; give the same --hidden-size, --num-layers, --preprocess, "
        f"--preprocess-p, --output-scale and --split as the checkpoint"
    )


def effective_values(config: TrainConfig) -> dict[str, Any]:
    """``config.to_dict()`` with the task family's defaults filled in: what the run computes, not how it was spelled.

    ``instances``, ``optimizee_steps`` and ``unroll`` left at None and task options left out
    take the family's values, so ``--instances 128`` on a quadratic run is no change.
    ``loss_weights`` becomes the weights of each truncation length the run has, so ``uniform``
    and ``(1.0,) * unroll`` are the same (and over one-step truncations so is ``final``). A family
    that cannot be built (an unregistered task, bad options) leaves the values as given.
    ``init_from`` becomes the absolute path of the checkpoint it names (a shipped name its file),
    so ``./a/optimizer.pt`` is ``a/optimizer.pt``; the file need not exist any more.
    """
    values = config.to_dict()
    if config.init_from is not None:
        try:
            values["init_from"] = str(resolve_checkpoint(config.init_from).resolve())
        except CheckpointError:  # gone (a resume no longer needs it): the path as written, made absolute
            values["init_from"] = os.path.abspath(home_path(config.init_from))
    try:
        family = get_task(config.task, **config.task_options)
        steps, length = horizon(config, family)
    except (ValueError, TypeError):
        return values
    instances = config.instances or family.default_instances
    values = {**values, "task_options": family.config(), "instances": instances, "optimizee_steps": steps, "unroll": length}
    try:
        table = loss_weight_table(config, steps, length)
    except ConfigError:  # explicit weights over a shorter last truncation: a run that cannot start, compared as spelled
        return values
    lengths = sorted({length, steps % length} - {0})  # the truncations the run has: full ones and a shorter last one
    return {**values, "loss_weights": tuple(tuple(table[n - 1, :n].tolist()) for n in lengths)}


def check_resumable(saved: TrainConfig, asked: TrainConfig) -> None:
    """Raises CheckpointError if ``asked`` changes anything of ``saved`` that a resume cannot.

    Effective values are compared (see :func:`effective_values`): a family default given
    explicitly is the same run as one left to the family.
    """
    saved_values, asked_values = effective_values(saved), effective_values(asked)
    changed = [key for key in saved_values if key not in RESUMABLE_OVERRIDES and saved_values[key] != asked_values[key]]
    if changed:
        def shown(config: TrainConfig, values: dict[str, Any], key: str) -> Any:
            # Loss weights are named as spelled: their effective form is a table of every truncation length.
            return config.loss_weights if key == "loss_weights" else values[key]

        details = ", ".join(
            f"{key}: checkpoint {shown(saved, saved_values, key)!r}, asked {shown(asked, asked_values, key)!r}" for key in changed
        )
        raise CheckpointError(
            f"the resume checkpoint was trained with a different configuration ({details}); "
            f"only {', '.join(RESUMABLE_OVERRIDES)} may change on resume"
        )


class MetaTrainer:
    """Holds one meta-training run's state; :meth:`run` trains, checkpointing as it goes."""

    def __init__(self, config: TrainConfig, out_dir: str | os.PathLike | None = None, *, warm_start: bool = True):
        # warm_start=False skips config.init_from: a resumed run takes its weights from the resume checkpoint.
        # out_dir is written as given (meta_train is what refuses to replace another run's files).
        self.config = config
        self.out_dir = home_path(out_dir) if out_dir is not None else None
        self.layout: ShardLayout = current_layout(config.accumulate)
        self.collectives = Collectives(self.layout)
        self.collectives.check_same("configuration", config.to_json())
        with self.collectives.together("setting up meta-training (device, task, data, warm start)"):
            self._set_up(config, warm_start)

    def _set_up(self, config: TrainConfig, warm_start: bool) -> None:
        """Everything of ``__init__`` that each process does on its own (no collectives)."""
        self.device = local_device(resolve_device(config.device))
        self.family = get_task(config.task, **config.task_options)
        self.steps, self.unroll = horizon(config, self.family)
        self.instances = config.instances or self.family.default_instances
        self.shard_instances = self.layout.shard_size(self.instances)
        self.weights = loss_weight_table(config, self.steps, self.unroll).to(self.device)
        self.rule = build_learned_rule(config)
        if warm_start and config.init_from is not None:
            initialise_from(self.rule, config.init_from)
        self.rule = set_kernel(self.rule.to(self.device), config.kernel)
        # kernel='fused' where it cannot run (the CPU, no Triton, a configuration it does not cover) is
        # refused now, before any instance is drawn, rather than at the first LSTM step of the first epoch.
        kernels_taken(self.rule, self.device)
        # One (instances, minibatches) generator pair per shard this process computes.
        self.streams = [shard_streams(config.seed, shard, self.layout.total, self.device) for shard in self.layout.local]
        self.instance_generator, self.batch_generator = self.streams[0]
        # Bytes of a shard's (instances, minibatches) generator states: what a process that cannot read its own sends.
        self.rng_state_bytes = [generator.get_state().numel() for generator in self.streams[0]]
        self.validation_task = self.family.sample(config.val_problems, make_generator(config.seed, "validation"), self.device)
        if config.second_order and self.validation_task.second_order_problem:
            raise ConfigError(f"--second-order is not available for task {config.task}: {self.validation_task.second_order_problem}")
        reason = graph_unsupported_reason(self.validation_task, None, self.device)
        if reason is None and self.layout.total > 1:
            reason = (f"the meta-batch is split into {self.layout.total} shards ({self.layout.world_size} processes x "
                      f"accumulate {self.layout.accumulate}), which run eagerly")
        if config.cuda_graphs == "on" and reason is not None:
            raise ConfigError(f"cuda_graphs='on' cannot be honoured: {reason}; use cuda_graphs='auto' or 'off'")
        self.use_graphs = config.cuda_graphs != "off" and reason is None
        self.meta_optimizer = torch.optim.Adam(self.rule.parameters(), lr=config.meta_lr, capturable=self.use_graphs)
        self.graphed: GraphedTruncation | None = None  # built on the first graphed epoch
        self.graph_lr: Tensor | None = None  # the learning rate the graphed Adam step reads
        self.epoch = 0
        self.skipped = 0
        self.consecutive_skipped = 0
        self.best_score = math.inf
        self.best_epoch = -1
        self.best_state = copy.deepcopy(self.rule.state_dict())
        # (best_score, best_epoch, best_state) from before the validation the last epoch had only for being the
        # last (off the val_every cadence): a resume with more epochs undoes that validation, which a run started
        # with them never makes. None once undone, or when no such validation was made.
        self.before_final: tuple[float, int, dict[str, Tensor]] | None = None
        self.history: list[dict[str, Any]] = []
        self.resumed_from: Path | None = None  # set by restore: a resumed run may change only RESUMABLE_OVERRIDES
        self._flag_vectors: dict[tuple, Tensor] = {}  # _meta_step_vector's flags on the device, by value

    # -- one epoch ---------------------------------------------------------------------------
    def train_epoch(self) -> Tensor:
        """One epoch: fresh instances, ``steps / unroll`` truncations, one meta-step each.

        Returns:
            The mean meta-loss per truncation (a 0-d tensor; NaN if every step was skipped).
        """
        config = self.config
        non_finite = torch.zeros(1)  # summed over the processes in the collective that reports failures
        starting = f"sampling epoch {self.epoch + 1}'s instances and their initial losses and setting its meta-learning rate"
        with self.collectives.together(starting, non_finite):
            tasks = [self.family.sample(self.shard_instances, instances, self.device) for instances, _ in self.streams]
            carries = [start(self.rule, task, generator=batches) for task, (_, batches) in zip(tasks, self.streams)]
            non_finite[0] = float(not all(bool(torch.isfinite(carry.loss).all()) for carry in carries))
            self._set_learning_rate(meta_learning_rate(config, self.epoch))
            truncate = self._graphed_truncation(tasks[0]) if self.use_graphs else self._eager_truncation(tasks)
        if non_finite.item():  # every process raises, none waits on the others
            raise NonFiniteError(
                f"task {config.task!r} gave a non-finite loss at its initial parameters; check the task's data and initialisation"
            )
        # From here to the closing all-reduce, a failure of this process's own work between two truncations' all-reduces
        # is told the others in their next one (_MissedAllReduce, then _close_epoch).
        meta_losses: list[Tensor] = []
        step = 0
        missed, given_up = None, None
        while step < self.steps:
            length = min(self.unroll, self.steps - step)
            try:
                result, carries = truncate(carries, length)
                with self._told_in_the_next_all_reduce(f"recording the meta-step of epoch {self.epoch + 1} "
                                                       f"(optimizee steps {step}-{step + length})"):
                    given_up = self._record_truncation(result, meta_losses)
            except _MissedAllReduce as failure:
                missed = failure
                break
            if not result.stepped:
                break  # The trajectory diverged: the rest of this epoch would only repeat it.
            step += length
        meta_loss = None
        if missed is None:
            try:
                with self._told_in_the_next_all_reduce(f"averaging the meta-losses of epoch {self.epoch + 1}"):
                    meta_loss = self._mean_meta_loss(meta_losses)
            except _MissedAllReduce as failure:
                missed = failure
        self._close_epoch(missed)
        broken = self._non_finite_state()  # before given_up: the cause of the skips, where it is this
        if broken:
            # Every process holds the same weights and Adam state, so every process raises here.
            raise NonFiniteError(
                f"the meta-optimizer's steps of epoch {self.epoch + 1} made the learned optimizer's {', '.join(broken)} NaN or "
                "infinite, though every meta-gradient stepped on was finite; training stopped and they were not written "
                f"(the checkpoints hold the last epoch written before). {self._non_finite_advice()}"
            )
        if given_up is not None:
            raise given_up
        return meta_loss

    def _non_finite_state(self) -> list[str]:
        """The rule's weights and Adam moments holding NaN or infinite values, by name (one host read per epoch).

        A meta-step on a finite meta-gradient can still write them (an extreme learning rate); they
        would turn every later meta-loss into NaN, skipped as if the task had diverged, and the
        checkpoints written from them could not be resumed.
        """
        named = [(name, weight) for name, weight in self.rule.named_parameters()]
        named += [(f"Adam {key} of {name}", state[key]) for name, weight in self.rule.named_parameters()
                  for state in [self.meta_optimizer.state.get(weight, {})] for key in ("exp_avg", "exp_avg_sq") if key in state]
        finite = torch.stack([torch.isfinite(tensor).all() for _, tensor in named]).tolist()
        return [name for (name, _), ok in zip(named, finite) if not ok]

    def _record_truncation(self, result: TruncationResult, meta_losses: list[Tensor]) -> NonFiniteError | None:
        """Counts a truncation's meta-step (or its skip) and appends its meta-loss to ``meta_losses`` if it stepped.

        Returns:
            The error to stop with once ``max_nonfinite`` meta-steps in a row were skipped, else None.
        """
        if result.stepped:
            self.consecutive_skipped = 0
            meta_losses.append(result.meta_loss.clone())  # a graph's output buffer is overwritten by the next replay
            return None
        self.skipped += 1
        self.consecutive_skipped += 1
        if self.consecutive_skipped < self.config.max_nonfinite:
            return None
        return NonFiniteError(
            f"{self.consecutive_skipped} meta-steps in a row had a non-finite meta-loss or meta-gradient "
            f"(epoch {self.epoch}); training stopped. {self._non_finite_advice()}"
        )

    @staticmethod
    def _mean_meta_loss(meta_losses: list[Tensor]) -> Tensor:
        """The mean of an epoch's meta-losses (0-d tensors); NaN if it has none (every step was skipped)."""
        return torch.stack(meta_losses).mean() if meta_losses else torch.tensor(math.nan)

    @contextlib.contextmanager
    def _told_in_the_next_all_reduce(self, what: str) -> Iterator[None]:
        """Runs process-local work between a truncation's all-reduce and the next; in a group, its failure becomes a :class:`_MissedAllReduce`.

        The others are already on their way to their next all-reduce, where :meth:`_close_epoch`
        tells them of it. Without a group the error is raised as it is.
        """
        try:
            yield
        except REPORTED as caught:
            if not self.collectives.active:
                raise
            raise _MissedAllReduce(caught, what) from caught

    def _close_epoch(self, missed: _MissedAllReduce | None) -> None:
        """The epoch's closing all-reduce: where a process that failed outside the truncations' all-reduces tells the others.

        A process whose clipping, meta-optimizer step or record of the step failed cannot know
        where the others are now: in the next truncation's all-reduce, or, the epoch over (or
        given up on non-finite steps, which it may not have seen), in this one; one that failed
        gathering its meta-gradients left them in this truncation's, one that failed averaging
        the meta-losses finds them in this one. All have one shape (every process
        contributes zeros here), so its flag meets them in any and every process raises
        together, instead of the others waiting in their next collective until the backend's
        timeout. One all-reduce and one host synchronisation per epoch, none per step; a no-op
        for one process.

        Raises:
            RuntimeError: another process failed (this one re-raises its own error).
        """
        if not self.collectives.active:
            if missed is not None:  # never raised without a group; never swallowed
                raise missed.error
            return
        error = None if missed is None else missed.error
        parameters = list(self.rule.parameters())
        size = sum(parameter.numel() for parameter in parameters)
        flat = self.collectives.sum_(self._meta_step_vector(parameters[0].new_zeros(size + 1), [0.0] * len(parameters), error))
        failures = flat[size + 2 + len(parameters) :].tolist()
        what = f"finishing epoch {self.epoch + 1}" if missed is None else missed.what
        self.collectives.raise_failures(failures, error, what)

    def _non_finite_advice(self) -> str:
        """What to do about persistent non-finite meta-steps, limited to what this run can change."""
        if self.resumed_from is None:
            return "Lower --meta-lr or --clip-grad-norm, or check the task."
        # A resume cannot change them (RESUMABLE_OVERRIDES): only a fresh run can, from this run's best weights,
        # written to out_dir or, before this run's first checkpoint there, beside the resume checkpoint.
        written = [directory / USE_CHECKPOINT for directory in (self.out_dir, self.resumed_from.parent) if directory is not None]
        best = next((path for path in written if path.is_file()), "this run's use checkpoint")
        return ("--meta-lr and --clip-grad-norm cannot change on resume: start a fresh run with lower ones (--init-from "
                f"{best} starts it from this run's best weights), allow more in a row with --max-nonfinite (a resume "
                "may change it), or check the task.")

    def _eager_truncation(self, tasks: list) -> Truncate:
        """One truncation computed eagerly: unroll, meta-loss, backward (shard by shard), clip, and the step if all is finite."""
        config = self.config
        parameters = list(self.rule.parameters())

        def truncate(carries: list[UnrollCarry], length: int) -> tuple[TruncationResult, list[UnrollCarry]]:
            shard_losses, next_carries = [], []
            steps = f"of epoch {self.epoch + 1} (optimizee steps {carries[0].step}-{carries[0].step + length})"
            unrolling = f"unrolling and backpropagating its shards {steps}"
            error = None
            try:
                self.meta_optimizer.zero_grad(set_to_none=True)
                weights = truncation_weights(self.weights, length)[:, None]
                for task, carry, (_, batches) in zip(tasks, carries, self.streams):
                    losses, carry = unroll(self.rule, task, carry, length, generator=batches, second_order=config.second_order)
                    shard_loss = (weights * losses).sum(0).mean()
                    shard_loss.backward()  # frees this shard's graph before the next shard's unroll
                    shard_losses.append(shard_loss.detach())
                    next_carries.append(detach_carry(carry))
            except REPORTED as caught:
                if not self.collectives.active:
                    raise
                # The other processes are on their way to the all-reduce: this one joins it and says it failed.
                error = caught
            if self.layout.total == 1:
                meta_loss, flags = shard_losses[0], None
            else:
                meta_loss, flags = self._average_over_shards(parameters, shard_losses, error, unrolling)
            # Past the all-reduce the others no longer wait for this process: a failure of its own from here on is
            # told them in their next all-reduce (_MissedAllReduce), not raised at once.
            stepping = f"clipping the meta-gradient and taking the meta-optimizer step {steps}"
            late = None
            try:
                grad_norm = nn.utils.clip_grad_norm_(parameters, config.clip_grad_norm)
                # One host synchronisation per meta-step, outside the unroll. A non-finite shard anywhere makes
                # the averaged loss or gradient non-finite, so every process skips the same steps.
                finite = torch.isfinite(meta_loss) & torch.isfinite(grad_norm)
            except REPORTED as caught:
                if not self.collectives.active:
                    raise
                late, finite = caught, torch.zeros((), dtype=torch.bool)  # raised below, once the flags are read
            if flags is None:
                stepped = bool(finite)
            else:  # the same synchronisation reads the all-reduce's flags
                flags[0] = finite
                read = flags.tolist()
                counts, failures = read[1 : len(parameters) + 1], read[len(parameters) + 1 :]
                if any(failures):  # every process raises here, together (one that failed late too)
                    self.collectives.raise_failures(failures, error, unrolling)
                if late is not None:
                    raise _MissedAllReduce(late, stepping) from late
                stepped = bool(read[0])
                for parameter, count in zip(parameters, counts):
                    if not count:  # no shard's graph reached it: no gradient, as with one shard (zeros would be an Adam step)
                        parameter.grad = None
            if stepped:
                with self._told_in_the_next_all_reduce(stepping):
                    self.meta_optimizer.step()
            return TruncationResult(meta_loss, grad_norm.detach(), stepped, next_carries[0]), next_carries

        return truncate

    def _average_over_shards(
        self, parameters: list[Tensor], shard_losses: list[Tensor], error: BaseException | None, what: str
    ) -> tuple[Tensor, Tensor]:
        """Replaces the accumulated meta-gradients of ``parameters`` (the rule's) by their mean over all shards of all processes.

        One all-reduce carries the gradients, the loss, per parameter whether it has a gradient,
        and per process whether it failed (``error``: this one did, and contributes nothing
        else). The sums are taken before the one division, so two processes with one shard each
        compute bit for bit what one process with two shards does.

        Args:
            what: what this process was doing, for the others' message if it failed.

        Returns:
            The mean meta-loss, and the summed flags (on the device, for the caller to read with
            the step's one host synchronisation): a free entry first (for the caller's
            finiteness flag), then per parameter the number of shards that gave it a gradient
            (one that none did gets a zero gradient here, which the caller must set to None),
            then per process :meth:`Collectives.failure_flags`.

        Raises:
            _MissedAllReduce: this process failed gathering its contribution; the epoch's
                closing all-reduce takes it to the others' all-reduce.
        """
        try:
            if error is not None:
                self.meta_optimizer.zero_grad(set_to_none=True)  # whatever the failed backward left
            grads = flatten_grads(parameters)
            loss = torch.stack(shard_losses).sum().reshape(1) if error is None else grads.new_zeros(1)
            flat = self._meta_step_vector(torch.cat([grads, loss]), grad_presence(parameters), error)
        except REPORTED as caught:
            if not self.collectives.active:
                raise
            raise _MissedAllReduce(error if error is not None else caught, what) from caught
        self.collectives.sum_(flat)
        size = grads.numel()
        averaged = flat[: size + 1].div_(self.layout.total)  # the flags stay counts
        assign_grads(parameters, averaged[:size])
        return averaged[size], flat[size + 1 :]

    def _meta_step_vector(self, values: Tensor, presence: list[float], error: BaseException | None) -> Tensor:
        """What a process contributes to a meta-step's all-reduce: ``values`` (gradients and loss), then the flags.

        The flags are a free entry, ``presence`` (per parameter, see :func:`grad_presence`) and
        :meth:`Collectives.failure_flags` of ``error``. The epoch's closing all-reduce
        (:meth:`_close_epoch`) contributes one of the same shape.
        """
        flags = (0.0, *presence, *self.collectives.failure_flags(error))
        key = (flags, values.dtype, values.device)
        cached = self._flag_vectors.get(key)
        if cached is None:
            # A copy from pageable host memory synchronises with the device: made every truncation, it was a
            # second host synchronisation per meta-step. The flags rarely change (presence is fixed by the rule
            # and task, a failure ends training), so each pattern is copied once; the cat below only reads it.
            if len(self._flag_vectors) >= 16:
                self._flag_vectors.clear()
            cached = self._flag_vectors[key] = torch.tensor(flags, dtype=values.dtype, device=values.device)
        return torch.cat([values, cached])

    def _graphed_truncation(self, task) -> Truncate:
        """The truncation replayed from CUDA graphs, holding this epoch's instances (deterministic tasks only)."""
        if self.graphed is None:
            self.graphed = GraphedTruncation(self.rule, self.meta_optimizer, task, self.weights, self.config.clip_grad_norm,
                                             second_order=self.config.second_order,
                                             use_graph=True if self.config.cuda_graphs == "on" else "auto")
        else:
            self.graphed.load_task(task)
        graphed = self.graphed

        def truncate(carries: list[UnrollCarry], length: int) -> tuple[TruncationResult, list[UnrollCarry]]:
            result = graphed(carries[0], length)
            return result, [result.carry]

        return truncate

    def _set_learning_rate(self, lr: float) -> None:
        """The meta-optimizer's learning rate: a float, or with graphs one device tensor updated in place.

        Replays read a tensor learning rate where it lives, so a schedule never forces a recapture.
        """
        if self.use_graphs:
            if self.graph_lr is None:
                self.graph_lr = torch.tensor(lr, dtype=torch.float32, device=self.device)
            else:
                self.graph_lr.fill_(lr)
        for group in self.meta_optimizer.param_groups:
            group["lr"] = self.graph_lr if self.use_graphs else lr

    def _check_meta_optimizer_state(self) -> None:
        """Raises a ValueError naming the tensor if the loaded Adam state does not fit the rule or is not finite.

        torch checks only the parameter groups: a misshapen moment fails at the first meta-step
        as a bare broadcast error, and a NaN one (or a negative second moment, or an infinite
        step count) turns the rule's weights into NaN with every meta-gradient finite.
        """
        parameters = dict(self.rule.named_parameters())
        states = {name: self.meta_optimizer.state.get(parameter) for name, parameter in parameters.items()}
        if any(states.values()) and not all(states.values()):
            raise ValueError(f"Adam has no state for {', '.join(name for name, state in states.items() if not state)}, "
                             "but has for the other weights")
        for name, state in states.items():
            if not state:  # no meta-step taken yet (every one so far skipped)
                continue
            absent = [key for key in ("step", "exp_avg", "exp_avg_sq") if key not in state]
            if absent:
                raise ValueError(f"Adam state of {name} lacks {', '.join(absent)}")
            step = float(state["step"])
            if not math.isfinite(step) or step < 0:
                raise ValueError(f"Adam step of {name} is {step}, not a count")
            for key in ("exp_avg", "exp_avg_sq"):
                value, shape = state[key], tuple(parameters[name].shape)
                if not isinstance(value, Tensor) or tuple(value.shape) != shape:
                    found = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                    raise ValueError(f"Adam {key} of {name} has shape {found}, expected {shape}")
            if bool((state["exp_avg_sq"] < 0).any()):
                raise ValueError(f"Adam exp_avg_sq of {name} holds negative values (a second moment is never below 0)")
        moments = [name for name in self._non_finite_state() if name.startswith("Adam ")]  # the weights: checked on loading
        if moments:
            raise ValueError(f"{moments[0]} holds NaN or infinite values")

    def _align_meta_optimizer(self) -> None:
        """After loading a state saved with or without graphs: this run's ``capturable`` and where Adam's steps live."""
        for group in self.meta_optimizer.param_groups:
            group["capturable"] = self.use_graphs
            group["lr"] = float(group["lr"])  # each epoch's _set_learning_rate hands graphs their tensor
        for state in self.meta_optimizer.state.values():
            if isinstance(state.get("step"), Tensor):
                # capturable Adam counts steps on the parameters' device; the eager one on the CPU.
                state["step"] = state["step"].to(self.device if self.use_graphs else "cpu", torch.float32)

    def validate(self) -> float:
        """Mean loss of the current rule on the fixed held-out instances over the last tenth of the steps.

        Averaging the last steps estimates the final loss with less minibatch noise than the
        last step alone, so selection picks better weights rather than luckier batches. In a
        process group, rank 0 validates and every process receives its score, so all keep the
        same best weights.
        """
        # Rank 0's score; the others add zeros to it in the collective that tells them whether it failed.
        summed = torch.zeros(1, dtype=torch.float64)
        with self.collectives.together("validating", summed):
            if self.layout.is_main:
                losses = evaluate(self.rule, self.validation_task, self.steps, seed=derive_seed(self.config.seed, "validation")).losses
                summed[0] = losses[-max(1, self.steps // 10) :].double().mean()
        score = summed.item()
        return score if math.isfinite(score) else math.inf

    def synchronise(self) -> None:
        """Gives every process rank 0's learned-optimizer weights (a no-op for one process).

        The processes start from the same seed, warm start or checkpoint anyway; this makes
        it certain, and later steps keep them equal because every process applies the same
        averaged meta-gradient.
        """
        if self.collectives.active:
            with torch.no_grad():
                for tensor in self.rule.state_dict().values():
                    self.collectives.broadcast_(tensor)

    # -- checkpoints -------------------------------------------------------------------------
    def _metadata(self) -> dict[str, Any]:
        return {
            "task": self.config.task,
            "task_options": self.family.config(),
            "optimizee_steps": self.steps,
            "unroll": self.unroll,
            "validation_score": self.best_score if math.isfinite(self.best_score) else None,
            "validation_problems": self.config.val_problems,
            "best_epoch": self.best_epoch,
            "epochs_trained": self.epoch,
            "train_config": self.config.to_dict(),
        }

    def save(self) -> None:
        """Writes the resume checkpoint, the use checkpoint (best weights) and the history."""
        if self.out_dir is None:
            return
        states = self._gather_rng_states()  # a collective: every process takes part, rank 0 writes
        with self.collectives.together("writing the checkpoints"):
            if self.layout.is_main:
                self._write_checkpoints(self._rng_states(states))

    def _write_checkpoints(self, rng: dict[str, Any]) -> None:
        # The resume checkpoint last: interrupted in between, a resume redoes what the use
        # checkpoint and history already hold, and writes all three again.
        best = build_rule(rule_spec(self.rule), _cpu(self.best_state), source="best weights")
        save_use_checkpoint(self.out_dir / USE_CHECKPOINT, best, self._metadata())
        history = json.dumps(self.history, indent=1).encode()
        atomic_write(self.out_dir / HISTORY_FILE, lambda handle: handle.write(history))
        save_resume_checkpoint(
            self.out_dir / RESUME_CHECKPOINT,
            {
                "train_config": self.config.to_dict(),
                "rule": rule_spec(self.rule),
                "state_dict": _cpu(self.rule.state_dict()),
                "best_state_dict": _cpu(self.best_state),
                "meta_optimizer": self.meta_optimizer.state_dict(),
                "epoch": self.epoch,
                "rng": rng,
                "progress": {
                    "skipped": self.skipped,
                    "consecutive_skipped": self.consecutive_skipped,
                    "best_score": self.best_score,
                    "best_epoch": self.best_epoch,
                    "history": self.history,
                    "before_final_validation": None if self.before_final is None else {
                        "best_score": self.before_final[0],
                        "best_epoch": self.before_final[1],
                        "best_state_dict": _cpu(self.before_final[2]),
                    },
                },
            },
        )

    def _gather_rng_states(self) -> list[Tensor]:
        """Every process's generator states, in rank order: per shard it computes, its instances' state then its minibatches'.

        In a process group one gather, which stops every process if one cannot read its states.
        """
        def local() -> Tensor:
            return torch.cat([state for pair in self.streams for state in (pair[0].get_state(), pair[1].get_state())])

        what = f"collecting the generator states for the checkpoint of epoch {self.epoch}"
        return self.collectives.gather_together(what, local, self.layout.accumulate * sum(self.rng_state_bytes))

    def _rng_states(self, gathered: list[Tensor]) -> dict[str, Any]:
        """The checkpoint's generator states from :meth:`_gather_rng_states`' output.

        Returns:
            ``{instances, batches}`` unsplit, else ``{shards: [{instances, batches}] * S}``.
        """
        instances, batches = torch.cat(gathered).view(self.layout.total, -1).split(self.rng_state_bytes, dim=1)
        if self.layout.total == 1:
            return {"instances": instances[0].clone(), "batches": batches[0].clone()}
        return {"shards": [{"instances": i.clone(), "batches": b.clone()} for i, b in zip(instances, batches)]}

    def _load_rng_states(self, rng: dict[str, Any], source: str) -> None:
        """Sets this process's generators from :meth:`_rng_states`' output; the number of shards must match."""
        saved = [(rng["instances"], rng["batches"])] if "shards" not in rng else [(s["instances"], s["batches"]) for s in rng["shards"]]
        if len(saved) != self.layout.total:
            raise CheckpointError(
                f"{source} splits each epoch's instances into {len(saved)} shard(s) (processes x accumulate), but this run "
                f"splits them into {self.layout.total} ({self.layout.world_size} processes x accumulate {self.layout.accumulate}); "
                f"resume with processes x --accumulate = {len(saved)}, for example --accumulate {len(saved)} in one process"
            )
        for (instances, batches), shard in zip(self.streams, self.layout.local):
            instances.set_state(saved[shard][0])  # instances are drawn on the CPU whatever the device
            continue_stream(batches, saved[shard][1])  # minibatches on the task's device, which may have changed

    def restore(self, path: str | os.PathLike) -> None:
        """Loads a resume checkpoint written by :meth:`save` into this trainer.

        In a process group every process loads its own copy (``path`` may differ per node); if
        any fails every process stops, and the processes must then hold the same training state.
        """
        with self.collectives.together("loading the resume checkpoint"):
            self._restore(path)
            # Local work too: failing on one process, it would leave the others waiting in check_same's gather.
            digest = self._state_digest() if self.collectives.active else None
        self.resumed_from = home_path(path)
        if digest is not None:
            self.collectives.check_same("training state (epoch, weights, meta-optimizer, history) after loading the resume "
                                        "checkpoint", digest)

    def _state_digest(self) -> str:
        """A digest of the state every process must share (not the generators, which are per shard)."""
        digest = hashlib.sha256()
        adam = [item for state in self.meta_optimizer.state.values() for item in state.items()]
        for name, value in [*self.rule.state_dict().items(), *self.best_state.items(), *adam]:
            digest.update(name.encode())
            digest.update(torch.as_tensor(value).detach().cpu().reshape(-1).view(torch.uint8).numpy())
        before_final = None if self.before_final is None else self.before_final[:2]
        progress = [self.epoch, self.skipped, self.consecutive_skipped, self.best_score, self.best_epoch, self.history, before_final]
        digest.update(json.dumps(progress, default=str).encode())
        return digest.hexdigest()

    def _restore(self, path: str | os.PathLike) -> None:
        payload = load_resume_checkpoint(path)
        check_resumable(saved_train_config(payload, path), self.config)
        source = f"resume checkpoint {path}"
        if payload["epoch"] > self.config.epochs:
            # Finished epochs cannot be undone: continuing would silently hand back a longer run than asked.
            raise CheckpointError(
                f"{source} has finished {payload['epoch']} epochs, but epochs asks for {self.config.epochs}; a resume "
                f"cannot undo epochs: resume with --epochs {payload['epoch']} or more ({payload['epoch']} only "
                f"completes and rewrites its files), or start a fresh run with --epochs {self.config.epochs}"
            )
        if payload["rule"] != rule_spec(self.rule):
            raise CheckpointError(
                f"{source} holds a rule ({payload['rule']}) that is not the one its train_config builds "
                f"({rule_spec(self.rule)}): the checkpoint is damaged"
            )
        self.rule.load_state_dict(build_rule(payload["rule"], payload["state_dict"], source=source).state_dict())
        self.best_state = self._saved_weights(payload, payload["best_state_dict"], source)
        with _damaged_entry(source, "meta_optimizer"):
            self.meta_optimizer.load_state_dict(payload["meta_optimizer"])
            self._check_meta_optimizer_state()
            self._align_meta_optimizer()
        with _damaged_entry(source, "rng"):
            self._load_rng_states(payload["rng"], source)
        progress, read = payload["progress"], {}
        epoch = payload["epoch"]  # load_resume_checkpoint checked that the epoch is a count and the history a list
        for name, read_value in (("skipped", lambda value: _count(value, 0)),
                                 ("best_score", _best_score), ("best_epoch", lambda value: _count(value, -1, epoch))):
            with _damaged_entry(source, f"progress.{name}"):
                read[name] = read_value(progress[name])
        with _damaged_entry(source, "progress.consecutive_skipped"):
            read["consecutive_skipped"] = _count(progress["consecutive_skipped"], 0, read["skipped"])
        with _damaged_entry(source, "progress.history"):
            not_records = [index for index, record in enumerate(progress["history"]) if not isinstance(record, dict)]
            if not_records:
                raise ValueError(f"item {not_records[0]} is a {type(progress['history'][not_records[0]]).__name__}, not an epoch's record")
        self.skipped, self.consecutive_skipped = read["skipped"], read["consecutive_skipped"]
        self.best_score, self.best_epoch = read["best_score"], read["best_epoch"]
        self.epoch, self.history = epoch, list(progress["history"])
        before = progress.get("before_final_validation")  # absent from checkpoints of older l2l versions
        with _damaged_entry(source, "progress.before_final_validation"):
            self.before_final = None if before is None else (
                _best_score(before["best_score"]), _count(before["best_epoch"], -1, epoch),
                self._saved_weights(payload, before["best_state_dict"], source),
            )

    def _saved_weights(self, payload: dict[str, Any], state_dict: Any, source: str) -> dict[str, Tensor]:
        """Saved weights of the checkpoint's rule, checked (a CheckpointError if damaged), on this run's device."""
        rule = build_rule(payload["rule"], state_dict, source=source)
        return {key: value.to(self.device) for key, value in rule.state_dict().items()}

    # -- the loop ----------------------------------------------------------------------------
    def _consider(self, score: float, record: dict[str, Any]) -> None:
        """Records a validation score and keeps the current weights if they are the best so far."""
        record["validation"] = score if math.isfinite(score) else None
        if record["epoch"] % self.config.val_every:
            # Only for being the last epoch. _consider replaces best_state rather than changing it, so no copy.
            self.before_final = (self.best_score, self.best_epoch, self.best_state)
        if score < self.best_score:
            self.best_score, self.best_epoch = score, self.epoch
            self.best_state = copy.deepcopy(self.rule.state_dict())
        self.history.append(record)

    def _undo_final_validation(self) -> None:
        """Forgets the validation a shorter run gave its last epoch for being the last, as a run started longer never made it.

        A resume checkpoint written before l2l kept :attr:`before_final` lacks the best weights
        from before that validation; if it made them the best it cannot be undone (a warning).
        """
        last = self.history[-1] if self.history else None
        if last is None or "validation" not in last or last["epoch"] != self.epoch or self.epoch % self.config.val_every == 0:
            return
        if self.before_final is None and self.best_epoch == self.epoch:
            warnings.warn(
                f"the resumed run validated epoch {self.epoch} only because it was its last, and the best weights are "
                f"that epoch's; this resume checkpoint predates the record of the best from before that validation, so "
                f"it cannot be undone: the history keeps it, and the run can select other weights than one started "
                f"with --epochs {self.config.epochs}",
                stacklevel=3,
            )
            return
        self.history[-1] = {key: value for key, value in last.items() if key != "validation"}
        if self.before_final is not None:
            self.best_score, self.best_epoch, self.best_state = self.before_final
            self.before_final = None

    def _record_epoch(
        self, meta_loss: Tensor, skipped: int, score: float | None, running: float | None, bar: tqdm
    ) -> float | None:
        """Records the epoch just trained in the history (with its validation ``score``, if validated) and on the progress bar.

        Args:
            meta_loss: what :meth:`train_epoch` returned.
            skipped: the meta-steps the epoch skipped (its meta-loss is the mean over the others).
            score: the epoch's validation score, or None if it was not validated.
            running: the running mean of the meta-losses so far (None before the first finite one).

        Returns:
            The running mean with this epoch's meta-loss.
        """
        loss = meta_loss.item()
        if math.isfinite(loss):
            running = loss if running is None else 0.95 * running + 0.05 * loss
        record: dict[str, Any] = {"epoch": self.epoch, "meta_loss": loss if math.isfinite(loss) else None, "skipped": skipped}
        if score is None:
            self.history.append(record)
        else:
            self._consider(score, record)
        # One redraw per epoch, by the update; a postfix that redraws too doubled the lines a log file gets.
        bar.set_postfix(meta_loss=f"{running:.4g}" if running is not None else "nan",
                        best_val=f"{self.best_score:.4g}", skipped=self.skipped, refresh=False)
        bar.update(1)
        return running

    def _stop_requested(self, stop: StopRequest) -> bool:
        """Whether any process has been asked to stop (every process gets the same answer, so all stop together)."""
        if self.collectives.active and self.collectives.any(stop.requested):
            stop.request("another process was asked to stop")
        return stop.requested

    def run(
        self,
        *,
        progress: bool = True,
        on_epoch: Callable[["MetaTrainer"], None] | None = None,
        stop: StopRequest | None = None,
    ) -> TrainResult:
        """Trains until ``config.epochs`` epochs are done, validating and checkpointing periodically.

        Args:
            progress: show a tqdm progress bar (rank 0 only).
            on_epoch: called with the trainer after each epoch. In a process group it must not use
                collectives; if it raises on one process, every process stops (the others with a
                RuntimeError naming it).
            stop: a request that, once made (on any process of a group), stops training at the
                next epoch boundary after writing the checkpoints there.

        Raises:
            TrainingInterrupted: ``stop`` was requested before the last epoch ended.
        """
        config = self.config
        together = self.collectives.together
        self.synchronise()
        # The process-local work between two collectives runs in together() blocks: raising on one process, it
        # would leave the others waiting in their next collective until the backend's timeout.
        bar = None
        running = None
        stop = stop if stop is not None else StopRequest()  # under torch.distributed another process may ask
        saved_epoch = 0  # the last epoch this call wrote; a fresh run has nothing worth writing at epoch 0
        try:
            with together("starting meta-training"):
                bar = tqdm(
                    total=config.epochs, initial=self.epoch, desc=f"meta-train {config.task}", unit="epoch",
                    disable=not (progress and self.layout.is_main), dynamic_ncols=True,
                    mininterval=_progress_interval(sys.stderr),
                )
                if self.epoch < config.epochs:
                    self._undo_final_validation()  # resumed with more epochs than the finished run had
            if config.init_from is not None and self.epoch == 0 and not self.history:
                # A warm start is a candidate too: fine-tuning must never hand back worse weights than it began with.
                score = self.validate()
                with together("recording the warm start's validation"):
                    self._consider(score, {"epoch": 0, "meta_loss": None})
            if self.epoch >= config.epochs:
                # Resumed with no epoch left (--epochs equal to the checkpoint's; restore refuses fewer): the last epoch is
                # validated as an uninterrupted run's would be, and the files are written (again).
                if self.history and "validation" not in self.history[-1]:
                    score = self.validate()
                    with together(f"recording epoch {self.epoch}"):
                        self._consider(score, self.history.pop())
                self.save()
            while self.epoch < config.epochs:
                if self._stop_requested(stop):
                    if self.epoch != saved_epoch:
                        self.save()
                    written = self.out_dir is not None and self.epoch > 0
                    raise TrainingInterrupted(
                        self.epoch, stop.reason, stop.signal_number, self.out_dir / RESUME_CHECKPOINT if written else None
                    )
                skipped_before = self.skipped
                meta_loss = self.train_epoch()
                self.epoch += 1
                last = self.epoch == config.epochs
                score = self.validate() if self.epoch % config.val_every == 0 or last else None
                with together(f"recording epoch {self.epoch}"):  # the one collective an epoch adds to a group's
                    running = self._record_epoch(meta_loss, self.skipped - skipped_before, score, running, bar)
                if self.epoch % config.checkpoint_every == 0 or last:
                    self.save()
                    saved_epoch = self.epoch
                if on_epoch is not None:
                    with together(f"running the on_epoch callback after epoch {self.epoch}"):
                        on_epoch(self)
            with together("handing back the best weights"):
                best = build_rule(rule_spec(self.rule), _cpu(self.best_state), source="best weights")
        finally:
            if bar is not None:
                bar.close()
        if self.best_epoch == -1 and self.layout.is_main:
            # The weights handed back were never validated finite: the caller must not take them for trained ones.
            warnings.warn(f"{no_finite_validation(config)}, and so does the rule returned", RuntimeWarning, stacklevel=2)
        return TrainResult(
            rule=best,
            best_score=self.best_score,
            best_epoch=self.best_epoch,
            epochs=self.epoch,
            skipped_steps=self.skipped,
            history=self.history,
            use_checkpoint=None if self.out_dir is None else self.out_dir / USE_CHECKPOINT,
            resume_checkpoint=None if self.out_dir is None else self.out_dir / RESUME_CHECKPOINT,
        )


def no_finite_validation(config: TrainConfig) -> str:
    """What a run whose validation scores were all non-finite hands back (its best epoch is -1)."""
    origin = "its fresh initialisation" if config.init_from is None else f"--init-from {config.init_from}"
    return (f"no validation score was finite (every validation diverged: null in {HISTORY_FILE}), so {USE_CHECKPOINT} "
            f"holds the weights training started from ({origin}), not trained ones")


def _progress_interval(stream: Any) -> float:
    """Seconds between progress-bar redraws: tqdm's 0.1 on a terminal (or in a notebook), 30 where ``stream`` is a file or pipe.

    A log keeps every redraw, so tqdm's rate there is a line per epoch; 30 s keeps it readable
    and still shows the run is alive. The bar's last line is written on close either way.
    """
    if any(kind.__name__ == "tqdm_notebook" for kind in tqdm.__mro__):
        return 0.1  # tqdm.auto chose a notebook widget, which redraws in place
    try:
        return 0.1 if stream.isatty() else 30.0
    except (AttributeError, ValueError):  # no stream, or a closed one
        return 30.0


def meta_train(
    config: TrainConfig,
    out_dir: str | os.PathLike | None = None,
    *,
    resume: str | os.PathLike | None = None,
    progress: bool = True,
    overwrite: bool = False,
    stop: StopRequest | None = None,
) -> TrainResult:
    """Meta-trains a coordinatewise LSTM optimizer as ``config`` says.

    In an initialised torch.distributed group every process calls this with the same
    arguments; each computes its ``config.accumulate`` shards of the epoch's instances and rank
    0 writes the files (see :mod:`l2l.meta.distributed`).

    Args:
        config: the run (task, horizon, meta-optimizer, validation, seed, ...).
        out_dir: where ``optimizer.pt`` (use), ``resume.pt`` and ``history.json`` are written;
            None writes nothing.
        resume: a resume checkpoint to continue from; its configuration must equal ``config``
            except for ``RESUMABLE_OVERRIDES``, and ``config.epochs`` must not be below the
            epochs it has finished.
        progress: show a tqdm progress bar.
        overwrite: replace the checkpoints of another run already in ``out_dir`` (refused by
            default: nothing is lost), and remove that run's ``bench.json``, which describes
            checkpoints that are gone. Resuming into the resume checkpoint's own directory never
            needs it.
        stop: a request that stops training at the next epoch boundary once made, after writing
            the checkpoints there (``l2l.meta.stop_on_signals`` makes one from SIGINT and SIGTERM).

    Raises:
        ConfigError: ``out_dir`` is not a writable directory, or holds another run and
            ``overwrite`` is False.
        CheckpointError: ``resume`` is unreadable or damaged, or does not fit ``config``.
        TrainingInterrupted: ``stop`` was requested before the last epoch.
    """
    # A leading ~ is the home directory (as for checkpoints and the data directory), not a folder named '~'.
    out_dir = None if out_dir is None else home_path(out_dir)
    resume = None if resume is None else home_path(resume)
    collectives = Collectives(current_layout(config.accumulate))
    # Every process must take the same collective path: one that writes (or resumes) while
    # another does not would wait forever in a collective the other never calls.
    collectives.check_same("choice of writing an output directory and of resuming",
                           json.dumps([out_dir is None, resume is None]))
    created: list[Path] = []  # the directories this call creates, deepest first
    if out_dir is not None:
        # Before any work: a run that cannot write, or would replace another run, fails now, not at
        # its first checkpoint, and on every process.
        with collectives.together("checking the output directory"):
            if collectives.layout.is_main:
                in_place = resume is not None and Path(resume).resolve().parent == Path(out_dir).resolve()
                created = missing_directories(Path(out_dir))
                prepare_output_dir(Path(out_dir), overwrite=overwrite or in_place)
                if overwrite and not in_place:
                    remove_replaced_report(Path(out_dir))
    try:
        trainer = MetaTrainer(config, out_dir, warm_start=resume is None)
        if resume is not None:
            trainer.restore(resume)
        return trainer.run(progress=progress, stop=stop)
    except BaseException:
        # A run that failed before its first checkpoint leaves no empty directories behind.
        remove_empty_directories(created)
        raise


def prepare_output_dir(out_dir: Path, *, overwrite: bool) -> None:
    """Creates ``out_dir``; refuses a path that is not a writable directory or already holds a run's checkpoints."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output directory {out_dir} is a file; choose another --out")
    held = [name for name in (RESUME_CHECKPOINT, USE_CHECKPOINT, HISTORY_FILE) if (out_dir / name).exists()]
    if held and not overwrite:
        raise ConfigError(
            f"{out_dir} already holds a training run ({', '.join(held)}); continue it with "
            f"`l2l train --resume {out_dir / RESUME_CHECKPOINT}`, choose another --out, or pass --overwrite to replace it"
        )
    make_writable_directory(out_dir, f"the output directory {out_dir}", "choose another --out")


def missing_directories(*directories: Path) -> list[Path]:
    """The directories among ``directories`` and their parents that do not exist yet, deepest first.

    What creating ``directories`` would create: after a failure, :func:`remove_empty_directories`
    removes those of them left empty, and never one that was there before.
    """
    missing = {d for directory in directories for d in (directory, *directory.parents) if not d.exists()}
    return sorted(missing, key=lambda d: len(d.absolute().parts), reverse=True)


def remove_empty_directories(created: list[Path]) -> None:
    """Removes the directories of ``created`` (deepest first, see :func:`missing_directories`) that are empty."""
    for directory in created:
        if directory.is_dir() and not any(directory.iterdir()):
            directory.rmdir()


def remove_replaced_report(out_dir: Path) -> None:
    """Removes the ``bench.json`` a replaced run left in ``out_dir``; a ConfigError if it cannot be.

    Only that report is removed: the checkpoints are replaced by the new run's, and anything
    else in ``out_dir`` was not written by l2l. Left there, a run with ``--no-bench`` (or one
    stopped before its comparison) would sit beside the earlier run's figures.
    """
    path = out_dir / BENCH_REPORT
    if not path.is_file():
        return
    try:
        path.unlink()
    except OSError as error:
        raise ConfigError(f"cannot remove the replaced run's comparison {path}: {error.strerror or error}; "
                          "remove it yourself or choose another --out") from None


def make_writable_directory(directory: Path, what: str, fix: str) -> None:
    """Creates ``directory`` (and its parents); a ConfigError naming ``what`` and ``fix`` if it cannot be written."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create {what}: {error.strerror}; {fix}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to {what}; {fix}")


def config_from_resume(path: str | os.PathLike, **overrides: Any) -> TrainConfig:
    """The configuration stored in a resume checkpoint, with ``overrides`` applied."""
    return dataclasses.replace(saved_train_config(load_resume_checkpoint(path), path), **overrides)


def saved_train_config(payload: dict[str, Any], path: str | os.PathLike) -> TrainConfig:
    """The TrainConfig of a loaded resume checkpoint; a damaged one is a CheckpointError."""
    try:
        return TrainConfig.from_dict(payload["train_config"])
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"resume checkpoint {path} holds an invalid train_config: {error}") from None


@contextlib.contextmanager
def _damaged_entry(source: str, entry: str) -> Iterator[None]:
    """Turns a failure to read ``entry`` of a resume checkpoint into a CheckpointError naming it."""
    try:
        yield
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as error:
        detail = f"missing {error}" if isinstance(error, KeyError) else f"{type(error).__name__}: {error}"
        raise CheckpointError(f"{source} has a damaged {entry} entry ({detail})") from None


def _count(value: Any, low: int, high: int | None = None) -> int:
    """A saved count, checked to be a whole number from ``low`` to ``high`` (if given); a ValueError otherwise."""
    # int(2.7) would read a damaged 2.7 as 2, and True as 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        raise ValueError(f"{value!r} is not a whole number from {low}" + (f" to {high}" if high is not None else " up"))
    return value


def _best_score(value: Any) -> float:
    """A saved best validation score, checked: a number, not NaN (no score is ever below NaN, so none would be kept)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value == -math.inf:
        raise ValueError(f"{value!r} is not a validation score (a number, or inf before any finite one)")
    return float(value)


def _cpu(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: value.detach().cpu().clone() for key, value in state.items()}

"""Any nn.Module as a batch of optimizee instances, evaluated functionally (functional_call + vmap over K)."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from l2l.objectives import GradReverse
from l2l.seeding import generator_seed, seeded_random_layers
from l2l.tasks.base import Task, TaskFamily, check_generator, check_num_instances, check_params, check_positive_int

# Module types whose parameters form each kind of parameter group (for per-group optimizers).
LAYER_KINDS: dict[str, tuple[type[nn.Module], ...]] = {
    "conv": (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
    "fc": (nn.Linear, nn.Bilinear),
}
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)


class Minibatch(NamedTuple):
    """One optimizee step's data: inputs ``[K, B, *features]``, labels ``[K, B]``, and the seed
    of the step's random layers (dropout), so that the loss is a function of parameters and batch."""

    inputs: Tensor
    labels: Tensor
    seed: int | None = None  # None: random layers draw from the global RNG


class SupervisedData(NamedTuple):
    """A supervised dataset as tensors on the task's device.

    ``x_*``: inputs ``[N, *features]`` (float); ``y_*``: int64 class labels ``[N]``.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@dataclass(frozen=True)
class ParamLayout:
    """Where each parameter of the module sits in an instance's flat vector of ``n`` numbers."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    kinds: tuple[str, ...]  # "conv", "fc" or "other" (see LAYER_KINDS); norm layers take the kind before them

    @property
    def numels(self) -> tuple[int, ...]:
        return tuple(math.prod(shape) for shape in self.shapes)

    @property
    def size(self) -> int:
        return sum(self.numels)

    @classmethod
    def of(cls, module: nn.Module) -> "ParamLayout":
        kind_of_param: dict[str, str] = {}
        previous = "other"
        for prefix, child in module.named_modules():
            if any(isinstance(child, types) for types in LAYER_KINDS.values()):
                previous = next(kind for kind, types in LAYER_KINDS.items() if isinstance(child, types))
                kind = previous
            elif isinstance(child, _NORMS):
                kind = previous
            else:
                kind = "other"
            dot = f"{prefix}." if prefix else ""
            if nn.utils.parametrize.is_parametrized(child):
                # A parametrized weight (weight_norm, spectral_norm) lives in child modules of the
                # layer's ``parametrizations``, which would otherwise be of kind "other".
                for name, _ in child.parametrizations.named_parameters():
                    kind_of_param[f"{dot}parametrizations.{name}"] = kind
            for name, _ in child.named_parameters(recurse=False):
                kind_of_param.setdefault(f"{dot}{name}", kind)
        # Frozen parameters (requires_grad=False) are not optimized: they travel with the buffers.
        named = [(name, p) for name, p in module.named_parameters() if p.requires_grad]
        check_flat_parameters(type(module).__name__, named)
        return cls(
            names=tuple(name for name, _ in named),
            shapes=tuple(p.shape for _, p in named),
            kinds=tuple(kind_of_param[name] for name, _ in named),
        )

    def unflatten(self, params: Tensor) -> dict[str, Tensor]:
        """``[K, n]`` -> ``{name: [K, *shape]}`` (views, no copies)."""
        pieces = params.split(self.numels, dim=1)
        return {name: piece.reshape(params.shape[0], *shape) for name, piece, shape in zip(self.names, pieces, self.shapes)}

    def flatten(self, module: nn.Module) -> Tensor:
        """A module's parameters as one vector ``[n]`` in this layout's order."""
        parameters = dict(module.named_parameters())
        return torch.cat([parameters[name].detach().reshape(-1) for name in self.names])

    def coordinates(self, kinds: tuple[str, ...]) -> dict[str, Tensor]:
        """Indices ``[n_g]`` into an instance's vector of the parameters of each kind in ``kinds``.

        Raises:
            ValueError: some parameter's kind is not in ``kinds`` (every coordinate needs a group).
        """
        uncovered = sorted({kind for kind in self.kinds if kind not in kinds})
        if uncovered:
            names = [name for name, kind in zip(self.names, self.kinds) if kind in uncovered]
            raise ValueError(
                f"parameters {', '.join(names)} are of kind {', '.join(uncovered)}, which the split "
                f"{','.join(kinds)} does not cover; add it to the split"
            )
        offsets = [0]
        for numel in self.numels:
            offsets.append(offsets[-1] + numel)
        groups = {}
        for kind in kinds:
            ranges = [torch.arange(offsets[i], offsets[i + 1]) for i, k in enumerate(self.kinds) if k == kind]
            groups[kind] = torch.cat(ranges) if ranges else torch.zeros(0, dtype=torch.long)
        return groups


def check_flat_parameters(module_name: str, named: list[tuple[str, Tensor]]) -> None:
    """Raises a ValueError unless the trainable parameters can be one flat real vector per instance.

    ``torch.cat`` would otherwise fail on no parameters, fail obscurely on several devices, and
    silently promote several dtypes (or a complex one), so that the module later ran on
    parameters of a dtype it was not built with.
    """
    if not named:
        raise ValueError(
            f"the {module_name} has no trainable parameters (none with requires_grad=True): "
            "there is nothing to optimize; give the module at least one parameter"
        )

    def listing(attribute: str) -> str:
        # A few names per value: a large module's full list would bury the one odd parameter.
        by_value: dict[str, list[str]] = {}
        for name, p in named:
            by_value.setdefault(str(getattr(p, attribute)), []).append(name)
        return "; ".join(
            f"{', '.join(names[:3])}{f' and {len(names) - 3} more' if len(names) > 3 else ''}: {value}"
            for value, names in by_value.items()
        )

    unusable = [(name, p) for name, p in named if not p.is_floating_point()]
    if unusable:
        raise ValueError(
            f"a module task's parameters must be real floating point, got "
            f"{', '.join(f'{name}: {p.dtype}' for name, p in unusable)}: store a complex parameter as "
            "its real and imaginary parts (torch.view_as_real), or freeze it (requires_grad_(False))"
        )
    if len({p.dtype for _, p in named}) > 1:
        raise ValueError(
            f"a module task keeps all trainable parameters in one flat tensor, so they must be of one dtype; "
            f"the {module_name} has {listing('dtype')}: convert the module with .to(dtype) in its factory"
        )
    if len({p.device for _, p in named}) > 1:
        raise ValueError(
            f"a module task keeps all trainable parameters in one flat tensor, so they must be on one device; "
            f"the {module_name} has {listing('device')}: build the module on one device (sample's device argument moves it)"
        )


def fixed_shuffle(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Examples in a fixed pseudo-random order (seed 0), so that prefixes (``train_examples``,
    ``eval_examples``) are unbiased samples even of files sorted by class."""
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[order], y[order]


def first_examples(x: Tensor, y: Tensor, count: int | None, what: str) -> tuple[Tensor, Tensor]:
    """The first ``count`` examples (all for None) of a training split.

    Raises:
        ValueError: there are fewer than ``count`` (``what`` names the dataset): a silent cut
            would run on fewer examples than the recorded ``train_examples`` says.
    """
    if count is None:
        return x, y
    if count > len(y):
        raise ValueError(
            f"train_examples={count} is more than the {len(y)} training images of {what}: "
            f"use at most {len(y)}, or leave it out for all"
        )
    return x[:count], y[:count]


def check_data(data: SupervisedData) -> None:
    """Raises a ValueError unless both splits have examples and one label per input."""
    fix = (
        "the data function must return SupervisedData(x_train, y_train, x_test, y_test), "
        "inputs [N, ...] and labels [N, ...] with N >= 1"
    )
    for split in ("train", "test"):
        x, y = getattr(data, f"x_{split}"), getattr(data, f"y_{split}")
        count = x.shape[0] if x.dim() else 0
        if count == 0:
            raise ValueError(f"x_{split} has no examples: {fix}")
        if y.dim() == 0 or y.shape[0] != count:
            raise ValueError(f"x_{split} has {count} examples but y_{split} has {y.shape[0] if y.dim() else 0}: {fix}")


Forward = Callable[[Tensor], Tensor]
Objective = Callable[[Forward, Tensor, Tensor], Tensor]


def cross_entropy(forward: Forward, inputs: Tensor, labels: Tensor) -> Tensor:
    """The default objective: mean cross-entropy of ``forward(inputs)`` (logits ``[B, C]``) on ``labels [B]``.

    Raises:
        TypeError: the module returned something else than a tensor (a tuple or dict of outputs).
    """
    logits = forward(inputs)
    if not isinstance(logits, Tensor):
        raise TypeError(
            f"the default objective (cross_entropy) needs the module to return logits [B, C], got "
            f"{type(logits).__name__}: pass objective=a function (forward, inputs, labels) -> loss that picks them out"
        )
    return nn.functional.cross_entropy(logits, labels)


def checked_loss(loss: Any) -> Tensor:
    """The objective's value for one instance, if it is one differentiable number.

    Raises:
        TypeError: it is not a tensor (a dict or tuple of losses).
        ValueError: it is not 0-d (per-example losses) or not floating point (no gradient).
    """
    expected = "objective must return the instance's loss as a 0-d floating point tensor"
    if not isinstance(loss, Tensor):
        raise TypeError(f"{expected}, got {type(loss).__name__}: return the loss itself (say out['loss'])")
    if loss.dim() != 0:
        raise ValueError(
            f"{expected}, got a tensor of shape {list(loss.shape)}: reduce it to one number per instance (.mean())"
        )
    if not loss.is_floating_point():
        raise ValueError(f"{expected}, got a {loss.dtype} tensor: it is not differentiable, so there is no gradient to optimize")
    return loss


VECTORIZE = ("auto", "vmap", "loop")


def resolve_vectorize(vectorize: str, module: nn.Module, device: torch.device) -> str:
    """``"vmap"`` or ``"loop"`` for ``vectorize`` (see :class:`ModuleTask`)."""
    if vectorize not in VECTORIZE:
        raise ValueError(f"vectorize must be one of {', '.join(VECTORIZE)}, got {vectorize!r}")
    if vectorize != "auto":
        return vectorize
    if any(isinstance(m, _UNBATCHABLE) for m in module.modules()):
        return "loop"
    has_conv = any(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())
    return "loop" if has_conv and device.type == "cpu" else "vmap"


# torch.func.vmap has no batching rule for aten::lstm, gru, rnn_tanh or lstm_cell (the other
# cells run through its slow per-example fallback), so "auto" loops over modules holding one.
_UNBATCHABLE = (nn.RNNBase, nn.RNNCellBase)


class ModuleTask(Task):
    """K instances of one module architecture, each with its own parameters and minibatches.

    The module is never trained in place: :meth:`loss` calls it with
    ``torch.func.functional_call`` on each instance's parameters, vectorised over the K
    instances with ``torch.func.vmap``. Buffers (batch-norm statistics) are per instance.
    The optimizee loss uses training mode (batch statistics) on a scratch copy of the
    buffers, so the task stays stateless and every optimizer sees the same task; held-out
    metrics re-estimate batch-norm statistics from a large training batch for the final
    parameters, then evaluate in eval mode.

    Args:
        module: the architecture (its own parameter values are not used).
        params0: initial parameters ``[K, n]``.
        buffers: per-instance buffers ``{name: [K, *shape]}``.
        data: the dataset on the task's device.
        batch_size: examples per minibatch (per instance).
        objective: the loss of one instance, ``objective(forward, inputs [B, ...], labels [B, ...]) -> []``,
            where ``forward(x)`` runs the module on that instance's parameters. It is vectorised over
            the K instances with vmap, so it may use ``torch.func`` transforms (input gradients,
            JVPs) on ``forward``; see :mod:`l2l.objectives`.
        eval_examples: test examples used by :meth:`metrics` (None: the whole test split).
        bn_examples: training examples from which :meth:`metrics` re-estimates batch-norm
            statistics for the final parameters (the first ones of the training split).
        vectorize: how the K instances are batched: ``"vmap"``, ``"loop"`` (one functional call
            per instance) or ``"auto"``: a loop for modules with recurrent layers (which vmap cannot
            batch) and for modules with convolutions on the CPU, where vmap's grouped convolutions
            cost up to 1.9x a loop (benchmarks/RESULTS.md), vmap elsewhere.
            The optimizer still sees all ``K * n`` coordinates in one call either way.
    """

    def __init__(
        self,
        module: nn.Module,
        params0: Tensor,
        buffers: dict[str, Tensor],
        data: SupervisedData,
        *,
        batch_size: int,
        objective: Objective = cross_entropy,
        eval_examples: int | None = None,
        bn_examples: int = 2048,
        vectorize: str = "auto",
    ):
        self.module = module
        self.layout = ParamLayout.of(module)
        if params0.dim() != 2 or params0.shape[1] != self.layout.size:
            raise ValueError(f"params0 must be [K, {self.layout.size}] for this module, got {list(params0.shape)}")
        check_data(data)  # shapes only: sample_batch would index past y_train, metrics divide by 0
        self.params0 = params0
        self.buffers = buffers
        self.data = data
        self.batch_size = batch_size
        self.objective = objective
        self.eval_examples = eval_examples
        self.test_split()  # too many eval_examples fails here, not at the metrics after a whole run
        self.bn_examples = bn_examples
        self.vectorize = resolve_vectorize(vectorize, module, params0.device)
        norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self._tracking_norms = norms
        # A cumulative-average batch norm (momentum=None) reads its batch count on the host, which
        # vmap refuses (and which would sync a GPU); the loss's running statistics are scratch,
        # so it runs with any momentum.
        self._cumulative_norms = [m for m in norms if m.momentum is None]

    @property
    def num_instances(self) -> int:
        return self.params0.shape[0]

    @property
    def num_params(self) -> int:
        return self.params0.shape[1]

    @property
    def device(self) -> torch.device:
        return self.params0.device

    def init_params(self) -> Tensor:
        return self.params0.clone()

    fixed_batches = False  # a random minibatch per step (Tangent1DTask's full batch says otherwise)

    def sample_batch(self, generator: torch.Generator | None) -> Minibatch:
        """An independent minibatch per instance, and a seed for its random layers (see :class:`Minibatch`).

        The seed is a hash of ``generator``'s state, read on the host (no device synchronisation),
        so the examples and the dropout masks both follow from the generator.
        """
        seed = None if generator is None else generator_seed(generator)
        index = torch.randint(
            0, self.data.x_train.shape[0], (self.num_instances, self.batch_size), generator=generator, device=self.device
        )
        return Minibatch(self.data.x_train[index], self.data.y_train[index], seed)

    def _call(self, params: dict[str, Tensor], buffers: dict[str, Tensor], inputs: Tensor) -> Tensor:
        return functional_call(self.module, (params, buffers), (inputs,))

    def outputs(self, params: Tensor, inputs: Tensor, *, shared_inputs: bool = False, buffers=None) -> Tensor:
        """Module outputs of every instance: ``params [K, n]``, inputs ``[K, B, ...]`` (or ``[B, ...]``
        shared by all instances) -> ``[K, B, ...]``."""
        check_params(self, params)
        buffers = {name: value.clone() for name, value in self.buffers.items()} if buffers is None else buffers
        return self._map(self._call, (self.layout.unflatten(params), buffers, inputs), (0, 0, None if shared_inputs else 0))

    def _map(self, fn: Callable[..., Tensor], args: tuple, in_dims: tuple) -> Tensor:
        """``fn`` on each instance's slice of ``args`` (dim 0 where ``in_dims`` is 0, whole where None), stacked."""
        if self.vectorize == "vmap":
            try:
                return vmap(fn, in_dims=in_dims, randomness="different")(*args)
            except RuntimeError as error:
                # Operators without a batching rule, .item() or data-dependent control flow in the
                # module: torch's message names the operator but not the way out.
                if "Batching rule" not in str(error) and "vmap: " not in str(error):
                    raise
                raise RuntimeError(
                    f"vectorize='vmap' cannot batch this module over the {self.num_instances} instances ({error}); "
                    "pass vectorize='loop' to ModuleFamily (one module call per instance)"
                ) from error

        def instance(arg, dim, k):
            if dim is None:
                return arg
            return {name: value[k] for name, value in arg.items()} if isinstance(arg, dict) else arg[k]

        # A loop over the K instances, not over parameters: each call still runs a whole module.
        return torch.stack([fn(*(instance(a, d, k) for a, d in zip(args, in_dims))) for k in range(self.num_instances)])

    def loss(self, params: Tensor, batch: Any = None) -> Tensor:
        if batch is None:
            raise ValueError("ModuleTask.loss needs a minibatch: pass task.sample_batch(generator)")
        check_params(self, params)
        if not isinstance(batch, tuple) or len(batch) not in (2, 3):
            raise ValueError(
                f"ModuleTask.loss takes a batch (inputs, labels) or (inputs, labels, seed), got {type(batch).__name__}"
                f"{f' of {len(batch)}' if isinstance(batch, tuple) else ''}: pass task.sample_batch(generator)"
            )
        inputs, labels, seed = Minibatch(*batch)
        self.module.train()
        buffers = {name: value.clone() for name, value in self.buffers.items()}

        def instance_loss(instance_params, instance_buffers, instance_inputs, instance_labels):
            def forward(x: Tensor) -> Tensor:
                return self._call(instance_params, instance_buffers, x)

            return checked_loss(self.objective(forward, instance_inputs, instance_labels))

        with _momenta(self._cumulative_norms, 0.1), seeded_random_layers(seed, self.device):
            return self._map(instance_loss, (self.layout.unflatten(params), buffers, inputs, labels), (0, 0, 0, 0))

    @property
    def second_order_problem(self) -> str | None:
        """Why second-order meta-gradients would be wrong: set where the module has a :class:`~l2l.objectives.GradReverse`.

        A ``grad_reverse`` call inside a module's own ``forward`` cannot be seen from here.
        """
        if any(isinstance(layer, GradReverse) for layer in self.module.modules()):
            return (
                "its module has a GradReverse layer: a gradient through it is not the gradient of any function, "
                "so differentiating it again gives wrong derivatives; train it first-order (the default)"
            )
        return None

    def test_split(self) -> tuple[Tensor, Tensor]:
        """The held-out examples :meth:`metrics` scores: the first ``eval_examples`` of the test split (all for None).

        Raises:
            ValueError: the test split has fewer than ``eval_examples``: a silent cut would report
                metrics over fewer examples than the recorded ``eval_examples`` says.
        """
        x_test, y_test = self.data.x_test, self.data.y_test
        if self.eval_examples is None:
            return x_test, y_test
        if self.eval_examples > len(y_test):
            raise ValueError(
                f"eval_examples={self.eval_examples} is more than the {len(y_test)} test examples of this task: "
                f"use at most {len(y_test)}, or leave it out for all"
            )
        return x_test[: self.eval_examples], y_test[: self.eval_examples]

    @torch.no_grad()
    def metrics(self, params: Tensor) -> dict[str, Tensor]:
        """Test loss and accuracy of every instance, ``[K]`` each, in eval mode."""
        buffers = self._estimate_buffers(params)
        self.module.eval()
        try:
            x_test, y_test = self.test_split()
            losses, correct = [], []
            for start in range(0, x_test.shape[0], 1000):  # Bounds activation memory for conv nets.
                logits = self.outputs(params, x_test[start : start + 1000], shared_inputs=True, buffers=buffers)
                labels = y_test[start : start + 1000].expand(self.num_instances, -1)
                losses.append(
                    nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view_as(labels).sum(1)
                )
                correct.append((logits.argmax(-1) == labels).sum(1))
        finally:
            self.module.train()
        count = x_test.shape[0]
        return {"test_loss": torch.stack(losses).sum(0) / count, "test_accuracy": torch.stack(correct).sum(0).double() / count}

    def _estimate_buffers(self, params: Tensor) -> dict[str, Tensor]:
        """Batch-norm statistics of the given parameters, from ``bn_examples`` training examples."""
        buffers = {name: value.clone() for name, value in self.buffers.items()}
        if not self._tracking_norms:
            return buffers
        # One large batch: running statistics become its statistics. Seed 0 keeps any dropout
        # in that pass, and so the metrics, independent of the global RNG.
        with _momenta(self._tracking_norms, 1.0), seeded_random_layers(0, self.device):
            self.module.train()
            self.outputs(params, self.data.x_train[: self.bn_examples], shared_inputs=True, buffers=buffers)
        return buffers

    def coordinate_groups(self, kinds: tuple[str, ...]) -> dict[str, Tensor]:
        """Indices into the flat ``[K * n]`` coordinates of each parameter kind (see :class:`ParamLayout`)."""
        per_instance = self.layout.coordinates(kinds)
        offsets = torch.arange(self.num_instances) * self.num_params
        return {kind: (offsets[:, None] + index[None, :]).reshape(-1).to(self.device) for kind, index in per_instance.items()}


@contextlib.contextmanager
def _momenta(norms: list[nn.Module], momentum: float) -> Iterator[None]:
    """Sets the batch norms' ``momentum`` for the duration of the block, then restores each one's own."""
    saved = [m.momentum for m in norms]
    try:
        for m in norms:
            m.momentum = momentum
        yield
    finally:
        for m, value in zip(norms, saved):
            m.momentum = value


def check_built_on_cpu(module: nn.Module) -> None:
    """Raises a ValueError unless every parameter and buffer of the factory's ``module`` is on the CPU.

    Only the CPU's generator is seeded around the factory: a module built on a GPU would be
    initialised from that device's unseeded global generator (and move it), not from the seed.
    """
    elsewhere = sorted({str(t.device) for t in (*module.parameters(), *module.buffers()) if t.device.type != "cpu"})
    if elsewhere:
        raise ValueError(
            f"the module factory built the {type(module).__name__} on {', '.join(elsewhere)}: build it on the CPU "
            "(sample moves the instances to their device), so that its initialisation follows the instance seeds"
        )


def init_instances(factory: Callable[[], nn.Module], num_instances: int, generator: torch.Generator) -> tuple[nn.Module, Tensor, dict[str, Tensor]]:
    """Builds ``num_instances`` independently initialised copies of ``factory()``'s module.

    Each instance is initialised by the module's own initialisers under a seed drawn from
    ``generator``; the global RNG is restored afterwards, so it is left as it was.

    Returns:
        ``(template, params0 [K, n], buffers {name: [K, *shape]})`` on the CPU.
    """
    seeds = torch.randint(0, 2**62, (num_instances,), generator=generator).tolist()
    flats, buffers = [], []
    template = None
    for seed in seeds:
        with seeded_random_layers(seed, torch.device("cpu")):  # the initialisers draw from the CPU generator
            module = factory()
        if template is None:
            template = module
            layout = ParamLayout.of(module)
            check_built_on_cpu(module)
        flats.append(layout.flatten(module))
        constants = {name: p for name, p in module.named_parameters() if not p.requires_grad}
        constants.update(module.named_buffers())
        buffers.append({name: value.detach().clone() for name, value in constants.items()})
    stacked = {name: torch.stack([b[name] for b in buffers]) for name in buffers[0]}
    return template, torch.stack(flats), stacked


class ModuleFamily(TaskFamily):
    """A family of tasks from a module factory, a dataset and a loss.

    Args:
        factory: builds the module (called once per instance, under a seed from the generator).
        data: returns the dataset on a device; called by every :meth:`sample` (each meta-training
            epoch), so it should cache what it loads or copies, as the built-in families do.
        batch_size: examples per minibatch.
        objective: the per-instance loss (see :class:`ModuleTask`).
        eval_examples: test examples for held-out metrics (None: all).
        task_type: the :class:`ModuleTask` subclass to build (override ``metrics`` there, say).
        vectorize: ``"auto"``, ``"vmap"`` or ``"loop"`` (see :class:`ModuleTask`).
    """

    name = "module"
    description = "any nn.Module on a supervised dataset"

    def __init__(
        self,
        factory: Callable[[], nn.Module],
        data: Callable[[torch.device], SupervisedData],
        *,
        batch_size: int = 128,
        objective: Objective = cross_entropy,
        eval_examples: int | None = None,
        task_type: type[ModuleTask] = ModuleTask,
        vectorize: str = "auto",
    ):
        check_positive_int("batch_size", batch_size)
        check_positive_int("eval_examples", eval_examples, optional=True)
        if vectorize not in VECTORIZE:
            raise ValueError(f"vectorize must be one of {', '.join(VECTORIZE)}, got {vectorize!r}")
        self.vectorize = vectorize
        self.factory = factory
        self.data = data
        self.batch_size = batch_size
        self.objective = objective
        self.eval_examples = eval_examples
        self.task_type = task_type

    def sample(self, num_instances: int, generator: torch.Generator, device="cpu") -> ModuleTask:
        check_num_instances(num_instances)
        check_generator(generator)
        device = torch.device(device)
        template, params0, buffers = init_instances(self.factory, num_instances, generator)
        return self.task_type(
            template.to(device),
            params0.to(device),
            {name: value.to(device) for name, value in buffers.items()},
            self.data(device),
            batch_size=self.batch_size,
            objective=self.objective,
            eval_examples=self.eval_examples,
            vectorize=self.vectorize,
        )

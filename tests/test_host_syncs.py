"""The README's "no host synchronisation inside the unroll", checked on the CPU for every task family, rule and path."""

import collections
import io
import sys

import pytest
import torch
from torch import nn
from torch.func import vmap
from torch.utils._python_dispatch import TorchDispatchMode

from l2l import LearnedOptimizer
from l2l.config import TrainConfig
from l2l.meta.evaluate import evaluate
from l2l.meta.graphs import GraphedTruncation
from l2l.meta.train import MetaTrainer
from l2l.meta.unroll import start, unroll
from l2l.optimizers import CoordinateWiseLSTM, PerGroupRule
from l2l.optimizers.baselines import BASELINES
from l2l.tasks import ModuleFamily, SupervisedData, get_task
from l2l.tasks.cifar import conv_net

from helpers import TinyMLPFamily
from host_syncs import host_syncs


@pytest.fixture(autouse=True)
def _threads():
    # Replaces conftest's two threads: what is read does not depend on them, and these small steps,
    # slowed by the counting, ran 3-40x slower with two intra-op threads on shared cores.
    torch.set_num_threads(1)


# -- the counter itself --------------------------------------------------------------------------


@pytest.mark.parametrize("read", [
    lambda x: x.sum().item(),
    lambda x: 1 if (x > 0).any() else 0,  # .any() in a Python if
    lambda x: float(x.detach()[0, 0]),
    lambda x: range(torch.tensor(3)),
    lambda x: x.tolist(),
    lambda x: x.cpu(),
    lambda x: f"{x.sum():.3f}",
    lambda x: print(x, file=io.StringIO()),
    lambda x: x[x > 0],  # a boolean mask: the output's shape depends on the data
    lambda x: torch.nonzero(x),
    lambda x: torch.where(x > 0),
    lambda x: torch.unique(x),
    lambda x: torch.equal(x, x),
    lambda x: torch.randint(0, torch.tensor(5), (3,)),  # a tensor read inside torch's argument parsing
    lambda x: torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([1, 2])),
    lambda x: vmap(lambda row: row * len(torch.unique(x)))(x),  # an unbatched tensor read inside a vmapped function
], ids=["item", "if-any", "float", "index", "tolist", "cpu", "format", "print", "mask", "nonzero", "where",
        "unique", "equal", "parsed", "repeat_interleave", "under-vmap"])
def test_the_counter_sees_every_kind_of_host_read(read):
    x = torch.randn(4, 3, requires_grad=True)
    with host_syncs() as reads:
        read(x)
    assert reads


def test_the_counter_sees_reads_in_a_backward_pass_and_not_where_there_are_none():
    class Reading(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.clone()

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, grad):
            return grad * bool(grad.sum() > 0)

    x = torch.randn(4, 3, requires_grad=True)
    with host_syncs() as reads:
        Reading.apply(x).sum().backward()
    assert [read.what for read in reads] == ["Tensor.__bool__", "aten::_local_scalar_dense"]
    assert "test_host_syncs.py" in reads[0].site
    with host_syncs() as reads:
        vmap(lambda row: row.masked_fill(row > 0, 0.0))(x.detach())  # sync-free under vmap
    assert reads == []
    with host_syncs() as reads:
        x.detach()[x.detach() > 0] = 0.0  # one mask and one value: torch makes it a masked_fill
    assert reads == []


# -- the unroll and evaluation: every task family, every rule ------------------------------------


def _synthetic(shape, classes, examples=40):
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(examples, *shape, generator=generator), torch.randint(0, classes, (examples,), generator=generator)

    def data(device):
        return SupervisedData(x[:30], y[:30], x[30:], y[30:])

    return data


def _conv(vectorize):
    # The CIFAR net, small: vmap is what a GPU takes, the loop what the CPU does.
    return ModuleFamily(lambda: conv_net(3, 2, 4), _synthetic((3, 32, 32), 3), batch_size=4, vectorize=vectorize)


MNIST_OPTIONS = dict(train_examples=256, eval_examples=50, batch_size=8)
FAMILIES = {
    "quadratic": lambda: get_task("quadratic"),
    "tangent-1d": lambda: get_task("tangent-1d"),
    "mlp": lambda: ModuleFamily(lambda: nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3)), _synthetic((4,), 3),
                                batch_size=8),
    "conv-vmap": lambda: _conv("vmap"),
    "conv-loop": lambda: _conv("loop"),
    "mnist": lambda: get_task("mnist", **MNIST_OPTIONS),
    "mnist-gp": lambda: get_task("mnist-gp", **MNIST_OPTIONS),
    "mnist-gp-linf": lambda: get_task("mnist-gp", norm="linf", **MNIST_OPTIONS),
    "mnist-gp-l1": lambda: get_task("mnist-gp", norm="l1", **MNIST_OPTIONS),
    "mnist-grl": lambda: get_task("mnist-grl", **MNIST_OPTIONS),
}
RULES = {
    "lstm": lambda: CoordinateWiseLSTM(seed=0),
    "per-group": lambda: PerGroupRule({"conv": CoordinateWiseLSTM(seed=1), "fc": CoordinateWiseLSTM(seed=2)}),
    **{name: (lambda rule=rule: rule(lr=0.01)) for name, rule in BASELINES.items()},
}


@pytest.fixture(params=list(FAMILIES))
def task(request):
    if request.param.startswith("mnist"):
        request.getfixturevalue("real_data")
    return FAMILIES[request.param]().sample(2, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("rule_name", list(RULES))
def test_no_optimizee_step_reads_a_tensor_on_the_host(task, rule_name):
    """Forward steps and, for the learned rules, the meta-backward, first and (where allowed) second order."""
    rule = RULES[rule_name]()
    if rule_name == "per-group" and not hasattr(task, "coordinate_groups"):
        pytest.skip("a per-group rule needs a module task")
    learned = isinstance(rule, nn.Module)
    for second_order in (False, True) if learned and not task.second_order_problem else (False,):
        batches = torch.Generator().manual_seed(1)
        carry = start(rule, task, generator=batches)
        with host_syncs() as reads:
            losses, _ = unroll(rule, task, carry, 2, generator=batches, second_order=second_order)
            if learned:
                losses.sum().backward()
        assert reads == [], "\n".join(map(str, reads))
        if learned:  # (a per-group rule's conv LSTM gets none on an MLP)
            trained = rule.rules["fc"] if rule_name == "per-group" else rule
            assert all(p.grad is not None for p in trained.parameters())


@pytest.mark.parametrize("rule_name", ["lstm", "adam"])
def test_evaluation_reads_the_host_a_fixed_number_of_times_whatever_the_steps(task, rule_name):
    # Once at the end (the losses and each metric come to the CPU), never per step.
    rule = RULES[rule_name]()
    counts = []
    for steps in (1, 4):
        with host_syncs() as reads:
            evaluate(rule, task, steps)
        counts.append(len(reads))
        assert {read.what for read in reads} == {"Tensor.cpu"}, "\n".join(map(str, reads))
    assert counts[0] == counts[1] == 1 + len(task.metrics(task.init_params()))


# -- meta-training: one read per truncation --------------------------------------------------------


def _own_reads(reads):
    """The reads l2l makes, less those of torch.optim's Adam, whose step counts live on the CPU (unless capturable) even for CUDA weights."""
    return [read for read in reads if not (read.in_torch or "").startswith("optim")]


@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("task_name", ["quadratic", TinyMLPFamily.name])
def test_meta_training_reads_the_host_once_per_truncation(task_name, accumulate):
    counts = {}
    for truncations in (1, 4):
        trainer = MetaTrainer(TrainConfig(task=task_name, device="cpu", instances=4, optimizee_steps=4, unroll=4 // truncations,
                                          accumulate=accumulate, val_problems=2))
        trainer.train_epoch()
        with host_syncs() as reads:
            trainer.train_epoch()
        counts[truncations] = _own_reads(reads)
        # bool(finite) is two records (the Python read and its operator), the shards' flags.tolist() one.
        per_truncation = 2 if accumulate == 1 else 1
        finite_reads = [read for read in counts[truncations] if "bool(finite)" in read.site or "flags.tolist()" in read.site]
        assert len(finite_reads) == per_truncation * truncations
    grown = [read for read in counts[4] if read not in counts[1]]
    assert len(counts[4]) - len(counts[1]) == 3 * per_truncation, "\n".join(map(str, grown))


def test_a_sharded_truncation_copies_nothing_from_the_host(monkeypatch):
    # torch.tensor(data, device="cuda") copies from pageable host memory, which synchronises with the
    # device: the flags appended to every truncation's all-reduce were one such copy, a second host
    # synchronisation per meta-step besides the one reading of the summed flags.
    trainer = MetaTrainer(TrainConfig(task="quadratic", device="cpu", instances=4, optimizee_steps=4, unroll=1, accumulate=2,
                                      val_problems=2))
    trainer.train_epoch()
    stepped = trainer.meta_optimizer.state_dict()["state"][0]["step"].item()
    made, original = [], torch.tensor

    def tensor(*args, **kwargs):
        made.append(f"{sys._getframe(1).f_code.co_filename}:{sys._getframe(1).f_lineno}")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "tensor", tensor)
    trainer.train_epoch()
    monkeypatch.setattr(torch, "tensor", original)
    assert made == []
    assert trainer.meta_optimizer.state_dict()["state"][0]["step"].item() == stepped + 4  # every truncation stepped


def test_the_graphed_truncation_off_cuda_reads_the_host_once():
    task = get_task("quadratic").sample(3, torch.Generator().manual_seed(0))
    rule = CoordinateWiseLSTM(seed=0)
    graphed = GraphedTruncation(rule, torch.optim.Adam(rule.parameters()), task, torch.ones(3), 1.0)
    carry = start(rule, task)
    graphed(carry, 3)
    with host_syncs() as reads:
        result = graphed(carry, 3)
    reads = _own_reads(reads)
    assert result.stepped
    assert len(reads) == 2 and all("stepped = bool(finite)" in read.site for read in reads), "\n".join(map(str, reads))


# -- the drop-in optimizer ---------------------------------------------------------------------------


def test_the_drop_in_step_reads_nothing_off_the_cpu_and_on_it_only_its_finiteness_per_chunk():
    # On the CPU the check is free and saves the masking (documented); elsewhere the flag stays on the
    # device. The meta device stands in for an accelerator: any read there would raise.
    for device in ("cpu", "meta"):
        model = nn.Sequential(*[nn.Linear(3, 3) for _ in range(20)]).to(device)  # 240 coordinates, 40 tensors
        optimizer = LearnedOptimizer(model.parameters(), CoordinateWiseLSTM(seed=0), lr=torch.tensor(0.5), chunk_size=100)
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        optimizer.step()
        with host_syncs() as reads:
            optimizer.step()
        sites = {read.site.split(" ", 1)[1] for read in reads}
        if device == "meta":
            assert reads == []
        else:
            assert sites == {"all_finite = bool(finite.all())"} and len(reads) == 2 * 3  # 3 chunks


# -- per-step work and the number of parameter tensors --------------------------------------------


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.__name__] += 1
        return func(*args, **(kwargs or {}))


class _ManyTensors(nn.Module):
    """``count`` parameter tensors whose forward is the same few operators whatever ``count``."""

    def __init__(self, count):
        super().__init__()
        self.weights = nn.ParameterList([nn.Parameter(torch.full((2,), 0.1)) for _ in range(count)])

    def forward(self, x):
        return x * torch.stack(list(self.weights)).sum(0)


@pytest.mark.parametrize("rule", [CoordinateWiseLSTM(seed=0), BASELINES["adam"](lr=0.1)], ids=["lstm", "adam"])
def test_a_step_adds_only_views_per_parameter_tensor(rule):
    """200 parameter tensors instead of 2 cost views only (the unflatten split, vmap's batch dims), no computation per tensor."""
    ops = {}
    for count in (2, 200):
        task = ModuleFamily(lambda: _ManyTensors(count), _synthetic((2,), 2), batch_size=4, vectorize="vmap").sample(
            3, torch.Generator().manual_seed(0))
        batches = torch.Generator().manual_seed(1)
        carry = start(rule, task, generator=batches)
        rule = rule.zero_grad(set_to_none=True) or rule if isinstance(rule, nn.Module) else rule
        with _Recorder() as recorder:
            losses, _ = unroll(rule, task, carry, 2, generator=batches)
            if losses.requires_grad:
                losses.sum().backward()
        ops[count] = recorder.ops
    grown = {name for name in ops[200] if ops[200][name] > ops[2][name]}
    assert grown <= {"view.default", "select.int", "permute.default"}, sorted(grown)
    per_tensor = (sum(ops[200].values()) - sum(ops[2].values())) / 198 / 2  # per tensor and step
    assert per_tensor <= 8, per_tensor

"""Module tasks: functional evaluation equals running the module; K instances equal separate ones."""

import pytest
import torch
from torch import nn

from l2l.meta.unroll import run, value_and_grad
from l2l.tasks import get_task
from l2l.meta.evaluate import evaluate
from l2l.optimizers import SGD, Adam, CoordinateWiseLSTM, PerGroupRule
from l2l.tasks.module import ModuleFamily, ModuleTask, ParamLayout, SupervisedData, cross_entropy

from gpu import CUDA, RECORDING, needs_cuda
from helpers import sensitive_rule


def small_conv_net():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3),
    )


def small_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.Sigmoid(), nn.Linear(6, 3))


def fake_data(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 1, 8, 8, generator=g)
    y = torch.randint(0, 3, (200,), generator=g)
    return SupervisedData(x[:150], y[:150], x[150:], y[150:])


@pytest.fixture(
    params=[(small_mlp, "vmap"), (small_mlp, "loop"), (small_conv_net, "vmap"), (small_conv_net, "loop")],
    ids=["mlp-vmap", "mlp-loop", "conv-bn-vmap", "conv-bn-loop"],
)
def family(request):
    factory, vectorize = request.param
    return ModuleFamily(factory, fake_data, batch_size=16, vectorize=vectorize)


def instance_module(task: ModuleTask, params: torch.Tensor, k: int) -> nn.Module:
    module = small_mlp() if len(task.layout.names) == 4 else small_conv_net()
    nn.utils.vector_to_parameters(params[k].detach().clone(), module.parameters())
    return module


def test_losses_and_gradients_equal_running_the_module(family):
    task = family.sample(3, torch.Generator().manual_seed(1))
    params = task.init_params() + 0.01 * torch.randn(task.init_params().shape, generator=torch.Generator().manual_seed(2))
    batch = task.sample_batch(torch.Generator().manual_seed(3))
    loss, grad = value_and_grad(task, params, batch)
    for k in range(3):
        module = instance_module(task, params, k).train()
        direct = nn.functional.cross_entropy(module(batch[0][k]), batch[1][k])
        direct.backward()
        torch.testing.assert_close(loss[k], direct.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad[k], torch.cat([p.grad.reshape(-1) for p in module.parameters()]), rtol=1e-4, atol=1e-6)


def test_k_instances_equal_separate_instances(family):
    task = family.sample(3, torch.Generator().manual_seed(1))
    losses, carry = run(Adam(lr=0.01), task, 5, generator=torch.Generator().manual_seed(4))
    batches = [task.sample_batch(torch.Generator().manual_seed(5))]
    for k in range(3):
        alone = ModuleTask(task.module, task.params0[k : k + 1], {n: b[k : k + 1] for n, b in task.buffers.items()},
                           task.data, batch_size=16)
        batch = (batches[0][0][k : k + 1], batches[0][1][k : k + 1])
        torch.testing.assert_close(alone.loss(carry.params[k : k + 1], batch), task.loss(carry.params, batches[0])[k : k + 1])


def test_instances_have_their_own_initialisation_and_data(family):
    before = torch.random.get_rng_state()
    task = family.sample(2, torch.Generator().manual_seed(1))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert not torch.equal(task.params0[0], task.params0[1])
    again = family.sample(2, torch.Generator().manual_seed(1))
    assert torch.equal(task.params0, again.params0)
    x, y, _ = task.sample_batch(torch.Generator().manual_seed(0))
    assert x.shape == (2, 16, 1, 8, 8) and y.shape == (2, 16)
    assert not torch.equal(x[0], x[1])


def test_metrics_equal_eval_mode_with_re_estimated_statistics():
    family = ModuleFamily(small_conv_net, fake_data, batch_size=16)
    task = family.sample(2, torch.Generator().manual_seed(1))
    _, carry = run(Adam(lr=0.01), task, 3, generator=torch.Generator().manual_seed(4))
    metrics = task.metrics(carry.params)
    data = task.data
    for k in range(2):
        module = instance_module(task, carry.params, k)
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = 1.0
        with torch.no_grad():
            module.train()(data.x_train[:2048])
            logits = module.eval()(data.x_test)
        accuracy = (logits.argmax(1) == data.y_test).double().mean()
        torch.testing.assert_close(metrics["test_accuracy"][k], accuracy)
        torch.testing.assert_close(metrics["test_loss"][k], nn.functional.cross_entropy(logits, data.y_test), rtol=1e-5, atol=1e-6)


def test_layout_kinds_follow_layers_and_norms():
    layout = ParamLayout.of(small_conv_net())
    kinds = dict(zip(layout.names, layout.kinds))
    assert kinds["0.weight"] == kinds["1.weight"] == "conv"  # BatchNorm2d after a conv
    assert kinds["5.weight"] == kinds["6.bias"] == kinds["8.weight"] == "fc"
    with pytest.raises(ValueError, match="does not cover; add it to the split"):
        layout.coordinates(("conv",))


def test_per_group_rule_applies_each_lstm_to_its_coordinates():
    family = ModuleFamily(small_conv_net, fake_data, batch_size=16)
    task = family.sample(2, torch.Generator().manual_seed(1))
    conv, fc = CoordinateWiseLSTM(seed=1), CoordinateWiseLSTM(seed=2)
    rule = PerGroupRule({"conv": conv, "fc": fc})
    groups = task.coordinate_groups(("conv", "fc"))
    grad = torch.randn(task.init_params().numel())
    state = rule.init_state(grad.numel(), groups=groups)
    update, _ = rule(grad, state)
    for name, lstm in (("conv", conv), ("fc", fc)):
        index = groups[name]
        expected, _ = lstm(grad[index], lstm.init_state(index.numel()))
        torch.testing.assert_close(update[index], expected)
    losses, _ = run(rule, task, 3, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(losses).all()


def test_per_group_rule_carries_each_groups_state_from_step_to_step():
    rules = {"a": sensitive_rule(seed=1, dtype=torch.float64), "b": sensitive_rule(seed=2, dtype=torch.float64, hidden_size=8)}
    rule = PerGroupRule(rules)
    groups = {"a": torch.tensor([5, 0, 3]), "b": torch.tensor([1, 4, 2, 6], dtype=torch.int32)}  # interleaved; int32 too
    state = rule.init_state(7, groups=groups)
    alone = {name: lstm.init_state(groups[name].numel()) for name, lstm in rules.items()}
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        grad = torch.randn(7, dtype=torch.float64, generator=generator)
        update, state = rule(grad, state)
        for name, lstm in rules.items():
            expected, alone[name] = lstm(grad[groups[name].long()], alone[name])
            torch.testing.assert_close(update[groups[name].long()], expected, rtol=0, atol=0)


def test_per_group_rule_refuses_groups_that_do_not_partition_the_coordinates():
    rule = PerGroupRule({"a": CoordinateWiseLSTM(seed=1), "b": CoordinateWiseLSTM(seed=2)})
    overlapping = {"a": torch.tensor([0, 1]), "b": torch.tensor([1, 2])}  # right total, coordinate 3 never updated
    with pytest.raises(ValueError, match=r"must partition range\(4\): some coordinates are repeated or out of range"):
        rule.init_state(4, groups=overlapping)
    with pytest.raises(ValueError, match="the groups cover 3 coordinates"):
        rule.init_state(4, groups={"a": torch.tensor([0, 1]), "b": torch.tensor([2])})
    rule.init_state(4, groups={"a": torch.tensor([3, 0]), "b": torch.tensor([1, 2])})  # any order is a partition
    with pytest.raises(ValueError, match=r"group 'a': indices must be a 1-D integer tensor, got shape \(1, 2\) and torch.int64"):
        rule.init_state(4, groups={"a": torch.tensor([[3, 0]]), "b": torch.tensor([1, 2])})  # failed at the first step
    with pytest.raises(ValueError, match=r"got shape \(2,\) and torch.float32"):
        rule.init_state(4, groups={"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([1, 2])})


@pytest.mark.parametrize(
    "task, options, message",
    [
        ("mnist", {"train_examples": -100}, "train_examples must be a positive integer or None, got -100"),
        ("mnist", {"eval_examples": 0}, "eval_examples must be a positive integer or None, got 0"),
        ("mnist-relu", {"batch_size": True}, "batch_size must be a positive integer, got True"),
        ("cifar10", {"channels": 0}, "channels must be a positive integer, got 0"),
        ("cifar10", {"hidden": "32"}, "hidden must be a positive integer, got '32'"),
        ("mnist-gp", {"layers": 0}, "layers must be a positive integer, got 0"),
        ("cifar10", {"batch_size": 1}, r"batch_size must be at least 2 \(the conv net's batch norm"),
        ("cifar10", {"train_examples": 1}, "train_examples must be at least 2"),
        ("quadratic", {"dim": True}, "dim must be a positive integer, got True"),
    ],
)
def test_task_options_out_of_range_are_refused_before_any_data_is_read(task, options, message, monkeypatch, tmp_path):
    monkeypatch.setenv("L2L_DATA", str(tmp_path))  # no data there: the options must fail first
    with pytest.raises(ValueError, match=message):
        get_task(task, **options)


def test_missing_minibatch_is_a_clear_error(family):
    task = family.sample(1, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="needs a minibatch"):
        task.loss(task.init_params())


def dropout_net():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.5), nn.Linear(12, 3))


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_dropout_masks_follow_the_minibatch_seed_and_leave_the_global_rng_alone(vectorize):
    task = ModuleFamily(dropout_net, fake_data, batch_size=16, vectorize=vectorize).sample(3, torch.Generator().manual_seed(1))
    params = task.init_params()
    batch = task.sample_batch(torch.Generator().manual_seed(3))
    assert isinstance(batch.seed, int)
    before = torch.get_rng_state()
    first = task.loss(params, batch)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(12345)
    torch.testing.assert_close(task.loss(params, batch), first, rtol=0, atol=0)
    other_masks = task.loss(params, batch._replace(seed=batch.seed + 1))
    assert not torch.allclose(other_masks, first)
    again = task.sample_batch(torch.Generator().manual_seed(3))
    assert again.seed == batch.seed and torch.equal(again.inputs, batch.inputs)
    # Without a seed (a plain (inputs, labels) pair) the masks come from the global RNG.
    torch.manual_seed(0)
    unseeded = task.loss(params, batch[:2])
    torch.manual_seed(1)
    assert not torch.allclose(task.loss(params, batch[:2]), unseeded)


@pytest.mark.cuda
@needs_cuda
def test_dropout_on_cuda_follows_the_minibatch_seed_and_restores_the_cuda_rng():
    if RECORDING:
        pytest.skip("launches no fused kernel")
    family = ModuleFamily(dropout_net, lambda device: SupervisedData(*(t.to(device) for t in fake_data())), batch_size=16)
    task = family.sample(3, torch.Generator().manual_seed(1), CUDA)
    params = task.init_params()
    batch = task.sample_batch(torch.Generator(device=CUDA).manual_seed(3))
    before = torch.cuda.get_rng_state(CUDA)
    first = task.loss(params, batch)
    assert torch.equal(torch.cuda.get_rng_state(CUDA), before)
    torch.cuda.manual_seed(7)
    torch.testing.assert_close(task.loss(params, batch), first, rtol=0, atol=0)
    assert not torch.allclose(task.loss(params, batch._replace(seed=batch.seed + 1)), first)


def test_optimizers_compared_on_a_dropout_task_see_the_same_masks_whatever_the_global_rng():
    task = ModuleFamily(dropout_net, fake_data, batch_size=16).sample(2, torch.Generator().manual_seed(1))
    torch.manual_seed(0)
    first = evaluate(SGD(lr=0.1), task, 4, seed=7)
    torch.manual_seed(99)
    second = evaluate(SGD(lr=0.1), task, 4, seed=7)
    torch.testing.assert_close(second.losses, first.losses, rtol=0, atol=0)
    torch.testing.assert_close(second.metrics, first.metrics, rtol=0, atol=0)
    assert not torch.equal(evaluate(SGD(lr=0.1), task, 4, seed=8).losses, first.losses)


def test_a_batch_that_is_not_a_minibatch_is_a_clear_error(family):
    task = family.sample(1, torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"takes a batch \(inputs, labels\) or \(inputs, labels, seed\), got list"):
        task.loss(task.init_params(), list(task.sample_batch(None)))


class TinyConvFamily(ModuleFamily):
    """A registered module family small enough to meta-train in a test."""

    name = "test-tiny-conv"
    description = "tiny conv net on random data"
    default_steps = 6
    default_unroll = 3
    default_instances = 2

    def __init__(self):
        super().__init__(small_conv_net, fake_data, batch_size=8)


def test_split_training_checkpoint_and_bench_end_to_end(tmp_path):
    from l2l.checkpoint import load_use_checkpoint
    from l2l.config import TrainConfig
    from l2l.meta.evaluate import benchmark
    from l2l.meta.train import meta_train
    from l2l.tasks import register_task

    register_task("test-tiny-conv", TinyConvFamily, replace=True)
    result = meta_train(
        TrainConfig(task="test-tiny-conv", split=("conv", "fc"), epochs=2, val_every=1, val_problems=2, hidden_size=4, device="cpu"),
        tmp_path, progress=False,
    )
    loaded = load_use_checkpoint(tmp_path / "optimizer.pt")
    assert isinstance(loaded.rule, PerGroupRule) and loaded.rule.group_names == ("conv", "fc")
    assert loaded.rule.rules["conv"].hidden_size == 4
    report = benchmark(TinyConvFamily(), {"lstm": loaded.rule}, baselines=("adam",), steps=4, problems=2, tune_problems=2,
                       lr_grid=(0.01, 0.1), seed=0, device=torch.device("cpu"))
    assert {"test_accuracy", "test_loss"} <= set(report["results"]["lstm"])
    assert result.epochs == 2


def test_vmap_and_loop_give_the_same_losses_gradients_and_metrics():
    tasks = {v: ModuleFamily(small_conv_net, fake_data, batch_size=16, vectorize=v).sample(3, torch.Generator().manual_seed(1))
             for v in ("vmap", "loop")}
    params = tasks["vmap"].init_params() + 0.01 * torch.randn(tasks["vmap"].init_params().shape,
                                                              generator=torch.Generator().manual_seed(2))
    batch = tasks["vmap"].sample_batch(torch.Generator().manual_seed(3))
    (loss_v, grad_v), (loss_l, grad_l) = (value_and_grad(tasks[v], params, batch) for v in ("vmap", "loop"))
    torch.testing.assert_close(loss_l, loss_v, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_l, grad_v, rtol=1e-4, atol=1e-6)
    for name, value in tasks["loop"].metrics(params).items():
        torch.testing.assert_close(value, tasks["vmap"].metrics(params)[name], rtol=1e-5, atol=1e-6)


def test_auto_vectorize_loops_only_over_conv_nets_on_the_cpu():
    def sample(factory):
        return ModuleFamily(factory, fake_data, batch_size=16).sample(2, torch.Generator().manual_seed(0))

    assert sample(small_conv_net).vectorize == "loop"
    assert sample(small_mlp).vectorize == "vmap"
    with pytest.raises(ValueError, match="vectorize must be one of auto, vmap, loop, got 'threads'"):
        ModuleFamily(small_mlp, fake_data, vectorize="threads")


def test_a_per_group_rule_skips_a_group_the_task_does_not_have():
    from l2l.optimizers import CoordinateWiseLSTM, PerGroupRule

    rules = {"conv": CoordinateWiseLSTM(seed=1), "fc": CoordinateWiseLSTM(seed=2)}
    rule = PerGroupRule(rules)
    grad = torch.randn(6)
    state = rule.init_state(6, groups={"conv": torch.zeros(0, dtype=torch.long), "fc": torch.arange(6)})
    update, new_state = rule(grad, state)
    expected, _ = rules["fc"](grad, rules["fc"].init_state(6))
    torch.testing.assert_close(update, expected)
    assert new_state.states[0].h.shape[-1] == 0


def frozen_first_layer():
    module = small_mlp()
    module[1].weight.requires_grad_(False)
    return module


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_frozen_parameters_are_kept_per_instance_and_not_optimized(vectorize):
    task = ModuleFamily(frozen_first_layer, fake_data, batch_size=16, vectorize=vectorize).sample(2, torch.Generator().manual_seed(1))
    assert "1.weight" not in task.layout.names and task.num_params == 6 + 6 * 3 + 3
    batch = task.sample_batch(torch.Generator().manual_seed(3))
    loss, grad = value_and_grad(task, task.init_params(), batch)
    for k in range(2):
        module = frozen_first_layer()
        with torch.no_grad():
            module[1].weight.copy_(task.buffers["1.weight"][k])
            trainable = [p for p in module.parameters() if p.requires_grad]
            nn.utils.vector_to_parameters(task.init_params()[k], trainable)
        direct = nn.functional.cross_entropy(module(batch[0][k]), batch[1][k])
        direct.backward()
        torch.testing.assert_close(loss[k], direct.detach())
        torch.testing.assert_close(grad[k], torch.cat([p.grad.reshape(-1) for p in trainable]))
    assert not torch.equal(task.buffers["1.weight"][0], task.buffers["1.weight"][1])  # each instance's own init


def test_a_cumulative_average_batch_norm_works_under_vmap():
    def factory():
        return nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8, momentum=None), nn.ReLU(), nn.Linear(8, 3))

    tasks = [ModuleFamily(factory, fake_data, batch_size=16, vectorize=v).sample(2, torch.Generator().manual_seed(1))
             for v in ("vmap", "loop")]
    batch = tasks[0].sample_batch(torch.Generator().manual_seed(3))
    (vmapped, _), (looped, _) = (value_and_grad(task, task.init_params(), batch) for task in tasks)
    torch.testing.assert_close(vmapped, looped)
    assert all(m.momentum is None for m in tasks[0].module.modules() if isinstance(m, nn.BatchNorm1d))


def test_sampling_leaves_the_cuda_generators_alone(monkeypatch):
    reseeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: reseeded.append(seed))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: reseeded.append(seed))
    ModuleFamily(small_mlp, fake_data, batch_size=16).sample(2, torch.Generator().manual_seed(1))
    assert reseeded == []


class _Extra(nn.Module):
    """small_mlp plus one extra parameter, to build the parameter sets ParamLayout must refuse."""

    def __init__(self, extra: nn.Parameter):
        super().__init__()
        self.net, self.extra = small_mlp(), extra

    def forward(self, x):
        return self.net(x) + self.extra.real.to(x.dtype).sum()


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: nn.Sequential(nn.Flatten(), nn.Softmax(-1)), "has no trainable parameters"),
        (lambda: small_mlp().requires_grad_(False), "has no trainable parameters"),
        (lambda: _Extra(nn.Parameter(torch.zeros(3, dtype=torch.float64))),
         r"must be of one dtype; the _Extra has extra: torch\.float64; net\.1\.weight, net\.1\.bias, net\.3\.weight and 1 more: torch\.float32: .*\.to\(dtype\)"),
        (lambda: _Extra(nn.Parameter(torch.zeros(3, device="meta"))), r"on one device; the _Extra has extra: meta; net\.1\.weight, .* and 1 more: cpu"),
        (lambda: _Extra(nn.Parameter(torch.zeros(3, dtype=torch.complex64))), r"real floating point.*extra: torch\.complex64"),
        # Only the CPU generator is seeded around the factory: a module built elsewhere (a GPU) would not follow the seed.
        (lambda: small_mlp().to("meta"), r"the module factory built the Sequential on meta: build it on the CPU \(sample moves"),
    ],
    ids=["no parameters", "all frozen", "two dtypes", "two devices", "complex", "not on the cpu"],
)
def test_modules_whose_parameters_cannot_form_one_flat_vector_are_refused_by_name(factory, message):
    with pytest.raises(ValueError, match=message):
        ModuleFamily(factory, fake_data, batch_size=16).sample(2, torch.Generator().manual_seed(0))


class _PairOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = small_mlp()

    def forward(self, x):
        return self.net(x), x  # (logits, features): the default objective needs the logits alone


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
@pytest.mark.parametrize(
    "factory, objective, error, message",
    [
        (small_mlp, lambda f, x, y: {"loss": nn.functional.cross_entropy(f(x), y)}, TypeError,
         r"objective must return the instance's loss as a 0-d floating point tensor, got dict"),
        (small_mlp, lambda f, x, y: nn.functional.cross_entropy(f(x), y, reduction="none"), ValueError,
         r"got a tensor of shape \[16\]: reduce it to one number per instance \(\.mean\(\)\)"),
        (small_mlp, lambda f, x, y: (f(x).argmax(1) == y).sum(), ValueError, r"got a torch\.int64 tensor: .*not differentiable"),
        (_PairOutput, cross_entropy, TypeError,
         r"the default objective \(cross_entropy\) needs the module to return logits \[B, C\], got tuple: pass objective="),
    ],
    ids=["dict", "per example", "integer", "tuple output"],
)
def test_an_objective_that_does_not_return_one_loss_names_what_it_returned(factory, objective, error, message, vectorize):
    task = ModuleFamily(factory, fake_data, batch_size=16, objective=objective, vectorize=vectorize).sample(
        2, torch.Generator().manual_seed(1)
    )
    with pytest.raises(error, match=message):
        value_and_grad(task, task.init_params(), task.sample_batch(torch.Generator().manual_seed(0)))


class _Recurrent(nn.Module):
    """An LSTM over the 8 rows of an 8x8 input: torch.func.vmap has no batching rule for aten::lstm."""

    def __init__(self, cell=False):
        super().__init__()
        self.rnn, self.out = (nn.LSTMCell if cell else nn.LSTM)(8, 5), nn.Linear(5, 3)

    def forward(self, x):
        rows = x.flatten(0, 1).transpose(0, 1)  # [8 rows, B, 8]
        if isinstance(self.rnn, nn.LSTMCell):
            state = None
            for row in rows:
                state = self.rnn(row, state)
            return self.out(state[0])
        return self.out(self.rnn(rows)[0][-1])


@pytest.mark.parametrize("cell", [False, True], ids=["LSTM", "LSTMCell"])
def test_auto_vectorize_loops_over_recurrent_modules_and_forced_vmap_names_the_fix(cell):
    family = ModuleFamily(lambda: _Recurrent(cell), fake_data, batch_size=8)
    task = family.sample(2, torch.Generator().manual_seed(0))
    assert task.vectorize == "loop"
    batch = task.sample_batch(torch.Generator().manual_seed(1))
    loss, _ = value_and_grad(task, task.init_params(), batch)
    module = _Recurrent(cell)
    nn.utils.vector_to_parameters(task.init_params()[1], module.parameters())
    torch.testing.assert_close(loss[1], nn.functional.cross_entropy(module(batch.inputs[1]), batch.labels[1]))
    forced = ModuleFamily(lambda: _Recurrent(cell), fake_data, batch_size=8, vectorize="vmap").sample(2, torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError, match=r"vectorize='vmap' cannot batch this module.*Batching rule not implemented.*pass vectorize='loop'"):
        forced.loss(forced.init_params(), batch)


def test_parametrized_layers_keep_their_kind():
    from torch.nn.utils.parametrizations import weight_norm

    layout = ParamLayout.of(nn.Sequential(weight_norm(nn.Conv2d(1, 2, 3)), nn.BatchNorm2d(2), nn.Flatten(), weight_norm(nn.Linear(8, 3))))
    assert dict(zip(layout.names, layout.kinds)) == {
        "0.bias": "conv", "0.parametrizations.weight.original0": "conv", "0.parametrizations.weight.original1": "conv",
        "1.weight": "conv", "1.bias": "conv",
        "3.bias": "fc", "3.parametrizations.weight.original0": "fc", "3.parametrizations.weight.original1": "fc",
    }
    layout.coordinates(("conv", "fc"))  # --split conv,fc covers every coordinate

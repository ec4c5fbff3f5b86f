"""GraphedTruncation: the eager fallback equals the meta-training loop; on CUDA, graph replays equal eager truncations.

Also its use by meta-training (``TrainConfig.cuda_graphs``): choice, refusal, resume across the two.
"""

import contextlib
import dataclasses

import pytest
import torch
from torch import nn

from l2l.config import ConfigError, TrainConfig
from l2l.meta.train import MetaTrainer, meta_learning_rate

from l2l.kernels import fused
from l2l.meta.graphs import GraphedTruncation, graph_unsupported_reason, task_tensors
from l2l.meta.unroll import detach_carry, start, unroll
from l2l.optimizers import CoordinateWiseLSTM, map_tensors
from l2l.optimizers.base import tensors_of
from l2l.tasks import ModuleFamily, QuadraticFamily, QuadraticTask, SupervisedData, get_task

from gpu import CUDA, RECORDING, needs_cuda


def manual_truncations(rule, optimizer, task, weights, truncations, steps):
    """What MetaTrainer.train_epoch does per truncation, written out."""
    carry = start(rule, task)
    meta_losses = []
    for _ in range(truncations):
        losses, carry = unroll(rule, task, carry, steps)
        meta_loss = (weights[:steps, None] * losses).sum(0).mean()
        optimizer.zero_grad(set_to_none=True)
        meta_loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(rule.parameters(), 1.0)
        if bool(torch.isfinite(meta_loss) & torch.isfinite(grad_norm)):
            optimizer.step()
        meta_losses.append(meta_loss.detach())
        carry = detach_carry(carry)
    return torch.stack(meta_losses), carry


def graphed_truncations(rule, optimizer, task, weights, truncations, steps, **options):
    runner = GraphedTruncation(rule, optimizer, task, weights, 1.0, **options)
    carry = start(rule, task)
    meta_losses = []
    for _ in range(truncations):
        result = runner(carry, steps)
        meta_losses.append(result.meta_loss.clone())
        carry = result.carry
    return torch.stack(meta_losses), carry, runner


def test_eager_fallback_off_cuda_equals_the_training_loop():
    task = QuadraticFamily().sample(8, torch.Generator().manual_seed(0))
    weights = torch.linspace(0.5, 1.0, 5)
    results = []
    for runner in (manual_truncations, graphed_truncations):
        rule = CoordinateWiseLSTM(seed=1)
        optimizer = torch.optim.Adam(rule.parameters(), lr=1e-2)
        out = runner(rule, optimizer, task, weights, 3, 5)
        results.append((out[0], out[1], [p.detach().clone() for p in rule.parameters()]))
    (losses, carry, params), (g_losses, g_carry, g_params) = results
    assert torch.equal(losses, g_losses)
    assert torch.equal(carry.params, g_carry.params) and carry.step == g_carry.step == 15
    for p, q in zip(params, g_params):
        assert torch.equal(p, q)


def test_graphs_are_refused_with_a_reason_off_cuda():
    task = QuadraticFamily().sample(2, torch.Generator().manual_seed(0))
    rule = CoordinateWiseLSTM()
    optimizer = torch.optim.Adam(rule.parameters())
    assert "CUDA" in graph_unsupported_reason(task, optimizer, torch.device("cpu"))
    with pytest.raises(RuntimeError, match="CUDA graph"):
        GraphedTruncation(rule, optimizer, task, torch.ones(3), 1.0, use_graph=True)
    assert not GraphedTruncation(rule, optimizer, task, torch.ones(3), 1.0).use_graph


# Uneven truncations (4, 4, 2) and a schedule that changes the learning rate every epoch.
GRAPHABLE = dict(epochs=3, instances=4, optimizee_steps=10, unroll=4, val_every=3, val_problems=4,
                 meta_lr=3e-3, meta_lr_schedule="cosine")


def test_trainer_through_the_graph_runner_equals_eager_training():
    """The graphed epoch loop (new instances loaded each epoch, a tensor learning rate, output buffers cloned).

    Off CUDA the runner falls back to eager truncations, so everything but the capture is checked
    against the eager trainer, to float32 rounding: Adam computes a tensor learning rate's step
    size in float32 where a float's is computed in double.
    """
    eager = MetaTrainer(TrainConfig(device="cpu", **GRAPHABLE))
    graphed = MetaTrainer(TrainConfig(device="cpu", **GRAPHABLE))
    assert not eager.use_graphs and not graphed.use_graphs  # auto: no CUDA here
    graphed.use_graphs = True  # what auto chooses on CUDA
    eager.run(progress=False)
    learning_rates = []  # the object the Adam step reads, and its value, per epoch
    graphed.run(progress=False, on_epoch=lambda t: learning_rates.append(
        (t.meta_optimizer.param_groups[0]["lr"], t.meta_optimizer.param_groups[0]["lr"].item())))
    assert graphed.graphed is not None and not graphed.graphed.use_graph
    # One tensor updated in place: a captured step reads it at one address, and the runner never recaptures.
    assert all(lr is learning_rates[0][0] for lr, _ in learning_rates)
    assert [value for _, value in learning_rates] == pytest.approx(
        [meta_learning_rate(graphed.config, epoch) for epoch in range(3)])
    assert len({value for _, value in learning_rates}) == 3  # the schedule did change it
    assert [r["meta_loss"] for r in graphed.history] == pytest.approx([r["meta_loss"] for r in eager.history], rel=1e-6)
    for name, value in eager.rule.state_dict().items():
        torch.testing.assert_close(graphed.rule.state_dict()[name], value, rtol=1e-6, atol=1e-9, msg=name)
    untouched = MetaTrainer(TrainConfig(device="cpu", **GRAPHABLE)).rule.state_dict()
    assert all(not torch.equal(untouched[name], value) for name, value in eager.rule.state_dict().items())


class EagerReplay:
    """Stands in for a captured CUDA graph on the CPU: replay() reruns what the capture recorded."""

    def __init__(self, replay):
        self.replay = replay


def capture_as_eager_replays(runner, steps):
    """GraphedTruncation._capture without CUDA: static outputs, written in place by each replay as a graph's are."""
    def body():
        runner.meta_optimizer.zero_grad(set_to_none=True)
        meta_loss, grad_norm, finite, carry = runner._body(runner._static, steps)
        for target, value in zip(tensors_of(runner._static), tensors_of(carry), strict=True):
            target.copy_(value)
        for target, value in zip(outputs, (meta_loss, grad_norm, finite)):
            target.copy_(value)

    outputs = (torch.zeros(()), torch.zeros(()), torch.zeros((), dtype=torch.bool))
    runner._graphs[steps] = (EagerReplay(body), EagerReplay(runner.meta_optimizer.step), outputs)
    runner._captured_settings = runner._settings()


def test_the_trainer_captures_each_truncation_length_once_for_all_its_epochs(monkeypatch):
    """Three epochs of truncations (4, 4, 2): one capture of 4 steps and one of the shorter last, none per epoch.

    The captures are stood in for by eager replays into static buffers, so the runner's
    bookkeeping (static carry, graphs by length, settings that would recapture) is what runs.
    """
    lengths = []
    monkeypatch.setattr("l2l.meta.graphs.graph_unsupported_reason", lambda task, optimizer, device: None)  # as on CUDA
    monkeypatch.setattr(GraphedTruncation, "_capture",
                        lambda runner, steps: lengths.append(steps) or capture_as_eager_replays(runner, steps))
    eager = MetaTrainer(TrainConfig(device="cpu", cuda_graphs="off", **GRAPHABLE))
    graphed = MetaTrainer(TrainConfig(device="cpu", **GRAPHABLE))
    graphed.use_graphs = True  # what auto chooses on CUDA
    eager.run(progress=False)
    graphed.run(progress=False)
    assert graphed.graphed.use_graph and lengths == [4, 2] and sorted(graphed.graphed._graphs) == [2, 4]
    assert [r["meta_loss"] for r in graphed.history] == pytest.approx([r["meta_loss"] for r in eager.history], rel=1e-6)
    for name, value in eager.rule.state_dict().items():
        torch.testing.assert_close(graphed.rule.state_dict()[name], value, rtol=1e-6, atol=1e-9, msg=name)


class _Stream:
    def wait_stream(self, other):
        pass


def test_a_truncation_that_cannot_be_captured_says_why_and_how_to_train_it(monkeypatch):
    """A fixed-batch task whose loss synchronises with the host (.item(), a data-dependent shape) fails its capture.

    torch's own error ("operation not permitted when stream is capturing") came out bare, from
    inside the first epoch of a run that asked for nothing (cuda_graphs 'auto'); it must say that
    the graph capture failed and how to train the task instead. The CUDA pieces are stood in for:
    the capture raises as torch's capture_end does.
    """
    class FailingCapture:
        def __init__(self, graph, pool=None):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")

    monkeypatch.setattr("l2l.meta.graphs.graph_unsupported_reason", lambda task, optimizer, device: None)  # as on CUDA
    for name, value in (("Stream", _Stream), ("current_stream", _Stream), ("stream", lambda s: contextlib.nullcontext()),
                        ("CUDAGraph", object), ("graph_pool_handle", lambda: None), ("graph", FailingCapture)):
        monkeypatch.setattr(torch.cuda, name, value)
    task = QuadraticFamily().sample(2, torch.Generator().manual_seed(0))
    rule = CoordinateWiseLSTM(seed=0)
    runner = GraphedTruncation(rule, torch.optim.Adam(rule.parameters()), task, torch.ones(3), 1.0)
    assert runner.use_graph
    before = [p.detach().clone() for p in rule.parameters()]
    with pytest.raises(RuntimeError, match=r"could not capture QuadraticTask's truncation of 3 steps as a CUDA graph "
                                           r"\(CUDA error: operation not permitted when stream is capturing\).*"
                                           r"cuda_graphs='off' \(l2l train --cuda-graphs off\)"):
        runner(start(rule, task), 3)
    assert all(torch.equal(p, q) for p, q in zip(rule.parameters(), before))  # the warm-up's steps were undone


def test_cuda_graphs_on_is_refused_where_unsupported_naming_why():
    with pytest.raises(ConfigError, match="cuda_graphs='on' cannot be honoured: CUDA graphs need a CUDA device"):
        MetaTrainer(TrainConfig(device="cpu", cuda_graphs="on", **GRAPHABLE))
    with pytest.raises(ConfigError, match="cuda_graphs must be one of auto, on, off, got 'yes'"):
        TrainConfig(cuda_graphs="yes")
    assert not MetaTrainer(TrainConfig(device="cpu", cuda_graphs="off", **GRAPHABLE)).use_graphs


def test_a_state_saved_with_graphs_resumes_without_them(tmp_path):
    """A graphed run's Adam state (capturable, device step counts, a tensor learning rate) loads into an eager run."""
    config = TrainConfig(device="cpu", checkpoint_every=1, **dict(GRAPHABLE, epochs=1))
    trainer = MetaTrainer(config, tmp_path)
    trainer.run(progress=False)
    payload = torch.load(tmp_path / "resume.pt", weights_only=True)
    for group in payload["meta_optimizer"]["param_groups"]:
        group["capturable"], group["lr"] = True, torch.tensor(group["lr"])
    torch.save(payload, tmp_path / "resume.pt")
    resumed = MetaTrainer(dataclasses.replace(config, epochs=2), tmp_path)
    resumed.restore(tmp_path / "resume.pt")
    group = resumed.meta_optimizer.param_groups[0]
    assert group["capturable"] is False and group["lr"] == pytest.approx(payload["meta_optimizer"]["param_groups"][0]["lr"].item())
    resumed.run(progress=False)  # an eager Adam step on capturable-saved state would raise
    assert resumed.epoch == 2 and torch.isfinite(next(resumed.rule.parameters())).all()


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("kernel", ["reference", "fused"])
def test_cuda_graph_replays_equal_eager_truncations(kernel):
    if kernel == "fused" and not fused.fused_available(CUDA):
        pytest.skip("the fused kernel needs Triton")
    task = QuadraticFamily().sample(128, torch.Generator().manual_seed(0), CUDA)
    weights = torch.ones(20, device=CUDA)
    results = []
    for use_graph in (False, True):
        rule = CoordinateWiseLSTM(seed=2, kernel=kernel).to(CUDA)
        optimizer = torch.optim.Adam(rule.parameters(), lr=1e-3, capturable=True)
        losses, carry, runner = graphed_truncations(rule, optimizer, task, weights, 5, 20, use_graph=use_graph)
        assert runner.use_graph == use_graph
        results.append((losses, carry.params.clone(), [p.detach().clone() for p in rule.parameters()]))
    (losses, params, weights_eager), (g_losses, g_params, weights_graph) = results
    torch.testing.assert_close(g_losses, losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_params, params, rtol=1e-5, atol=1e-6)
    for a, b in zip(weights_graph, weights_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def graphs_match_eager_over_two_epochs(family, lengths, *, seed, new_lr=None):
    """Two epochs of 16 instances of ``family`` (loaded into the runner), truncations of ``lengths``, graphed and eager.

    ``new_lr`` is set as the second epoch's learning rate (a schedule step, which recaptures).
    """
    weights = torch.ones(max(lengths), device=CUDA)
    outcomes = []
    for use_graph in (False, True):
        # Each run samples its own instances: load_task copies the second epoch's into the first
        # task (the runner's static one), so shared tasks would start the second run on epoch 2's.
        tasks = [family.sample(16, torch.Generator().manual_seed(k), CUDA) for k in range(2)]
        rule = CoordinateWiseLSTM(seed=seed).to(CUDA)
        optimizer = torch.optim.Adam(rule.parameters(), lr=1e-3, capturable=True)
        runner = GraphedTruncation(rule, optimizer, tasks[0], weights, 1.0, use_graph=use_graph)
        assert runner.use_graph == use_graph or RECORDING
        losses = []
        for epoch, task in enumerate(tasks):
            if epoch:
                runner.load_task(task)
                for group in optimizer.param_groups:
                    group["lr"] = new_lr if new_lr is not None else group["lr"]
            carry = start(rule, runner.task)
            for steps in lengths:
                result = runner(carry, steps)
                losses.append(result.meta_loss.clone())
                carry = result.carry
        outcomes.append((torch.stack(losses), [p.detach().clone() for p in rule.parameters()]))
    torch.testing.assert_close(outcomes[1][0], outcomes[0][0], rtol=1e-5, atol=1e-6)
    for a, b in zip(outcomes[1][1], outcomes[0][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_new_task_new_length_and_lr_change():
    # A shorter last truncation: its own graph.
    graphs_match_eager_over_two_epochs(QuadraticFamily(), (20, 20, 7), seed=3, new_lr=5e-4)


@pytest.mark.cuda
@needs_cuda
def test_cuda_meta_training_with_graphs_equals_eager():
    """``l2l train`` at the paper's quadratic batch (128 x 10) replays graphs by default and trains as eagerly."""
    config = TrainConfig(device=str(CUDA), **dict(GRAPHABLE, instances=128, optimizee_steps=40, unroll=20, val_problems=16))
    runs = {}
    for graphs in ("auto", "off"):
        trainer = MetaTrainer(dataclasses.replace(config, cuda_graphs=graphs))
        assert trainer.use_graphs == (graphs == "auto") or RECORDING
        trainer.run(progress=False)
        runs[graphs] = trainer
    losses = [torch.tensor([r["meta_loss"] for r in runs[g].history]) for g in ("auto", "off")]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    for name, value in runs["off"].rule.state_dict().items():
        torch.testing.assert_close(runs["auto"].rule.state_dict()[name], value, rtol=1e-5, atol=1e-7)


class ShiftedQuadraticTask(QuadraticTask):
    """A quadratic whose tensors also sit in a dict and whose scale is a plain setting."""

    def __init__(self, W, y, scale=1.0):
        super().__init__(W, y)
        self.extra = {"shift": torch.zeros_like(y)}
        self.scale = scale

    def loss(self, params, batch=None):
        return self.scale * super().loss(params - self.extra["shift"], batch)


def shifted(seed, k=3, dtype=torch.float32, scale=1.0):
    task = QuadraticFamily().sample(k, torch.Generator().manual_seed(seed))
    shift = torch.randn(task.y.shape, generator=torch.Generator().manual_seed(seed + 100))
    new = ShiftedQuadraticTask(task.W.to(dtype), task.y.to(dtype), scale)
    new.extra["shift"] = shift.to(dtype)
    return new


def test_load_task_copies_nested_tensors_and_refuses_instances_that_do_not_fit():
    rule = CoordinateWiseLSTM(seed=0)
    runner = GraphedTruncation(rule, torch.optim.Adam(rule.parameters()), shifted(0), torch.ones(5), 1.0)
    addresses = {name: t.data_ptr() for name, t in task_tensors(runner.task).items()}
    assert set(addresses) == {"W", "y", "extra[0]"}
    new = shifted(1)
    runner.load_task(new)
    for name, tensor in task_tensors(runner.task).items():
        assert tensor.data_ptr() == addresses[name] and torch.equal(tensor, task_tensors(new)[name])
    with pytest.raises(ValueError, match=r"W has shape \[4, 10, 10\], the captured one \[3, 10, 10\].*build a new GraphedTruncation"):
        runner.load_task(shifted(2, k=4))
    with pytest.raises(ValueError, match=r"extra\[0\] has dtype torch.float64, the captured one torch.float32"):
        runner.load_task(shifted(2, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"scale is 2.0, the captured one 1.0"):
        runner.load_task(shifted(2, scale=2.0))
    with pytest.raises(TypeError, match="expected a ShiftedQuadraticTask, got QuadraticTask"):
        runner.load_task(QuadraticFamily().sample(3, torch.Generator().manual_seed(0)))
    assert torch.equal(runner.task.W, new.W)  # a refused load copies nothing


def test_graph_reasons_name_the_tasks_device_minibatches_and_a_fresh_optimizer_that_does_not_start_at_zero(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the checks read devices, they launch nothing
    cuda = torch.device("cuda", 0)
    task = QuadraticFamily().sample(2, torch.Generator().manual_seed(0))
    rule = CoordinateWiseLSTM()
    assert graph_unsupported_reason(task, torch.optim.Adam(rule.parameters(), capturable=True), cuda) is None
    assert "capturable=True" in graph_unsupported_reason(task, torch.optim.Adam(rule.parameters()), cuda)
    nadam = torch.optim.NAdam(rule.parameters(), capturable=True)
    assert "a fresh NAdam's state does not start at zero" in graph_unsupported_reason(task, nadam, cuda)
    stepped = torch.optim.NAdam(rule.parameters())  # a capturable step needs CUDA: step, then mark it capturable
    for p in rule.parameters():
        p.grad = torch.zeros_like(p)
    stepped.step()
    stepped.param_groups[0]["capturable"] = True
    assert graph_unsupported_reason(task, stepped, cuda) is None  # its state exists: the snapshot restores it
    minibatches = ModuleFamily(lambda: nn.Linear(3, 2), lambda device: SupervisedData(
        torch.randn(8, 3), torch.zeros(8, dtype=torch.long), torch.randn(8, 3), torch.zeros(8, dtype=torch.long)), batch_size=4)
    assert "ModuleTask draws a new minibatch every step" in graph_unsupported_reason(
        minibatches.sample(1, torch.Generator().manual_seed(0)), None, cuda)
    # The runner asks about the task's device, not where the loss weights happen to be.
    with pytest.raises(ValueError, match="loss_weights are on meta, the task on cpu"):
        GraphedTruncation(rule, torch.optim.Adam(rule.parameters()), task, torch.ones(3, device="meta"), 1.0)


def test_warmup_steps_and_loss_weights_are_checked_before_anything_runs():
    task = QuadraticFamily().sample(2, torch.Generator().manual_seed(0))
    rule = CoordinateWiseLSTM()
    optimizer = torch.optim.Adam(rule.parameters())
    with pytest.raises(ValueError, match="warmup must be a positive integer, got 0"):
        GraphedTruncation(rule, optimizer, task, torch.ones(5), 1.0, warmup=0)
    with pytest.raises(ValueError, match=r"loss_weights must be \[T\] or \[T, T\], got \[1, 1, 5\]"):
        GraphedTruncation(rule, optimizer, task, torch.ones(1, 1, 5), 1.0)
    runner = GraphedTruncation(rule, optimizer, task, torch.ones(5), 1.0)
    for steps in (0, 6):
        with pytest.raises(ValueError, match=f"steps must be between 1 and the loss weights' length 5, got {steps}"):
            runner(start(rule, task), steps)


def test_the_eager_fallback_draws_minibatches_from_the_given_generator():
    family = ModuleFamily(lambda: nn.Sequential(nn.Flatten(), nn.Linear(4, 3)), lambda device: SupervisedData(
        torch.randn(64, 4, generator=torch.Generator().manual_seed(0)), torch.arange(64) % 3,
        torch.randn(8, 4), torch.arange(8) % 3), batch_size=8)
    task = family.sample(2, torch.Generator().manual_seed(1))
    meta_losses = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        rule = CoordinateWiseLSTM(seed=1)
        runner = GraphedTruncation(rule, torch.optim.Adam(rule.parameters(), lr=1e-2), task, torch.ones(4), 1.0)
        generator = torch.Generator().manual_seed(5)
        carry = start(rule, task, generator=generator)
        meta_losses.append(torch.stack([runner(carry, 4, generator=generator).meta_loss for _ in range(2)]))
    assert torch.equal(meta_losses[0], meta_losses[1])
    rule = CoordinateWiseLSTM(seed=1)
    generator = torch.Generator().manual_seed(5)
    losses, _ = unroll(rule, task, start(rule, task, generator=generator), 4, generator=generator)
    torch.testing.assert_close(meta_losses[0][0], losses.sum(0).mean().detach(), rtol=0, atol=0)


def test_a_changed_hyperparameter_clipping_or_kernel_recaptures_and_a_tensor_lr_is_read_at_its_address():
    task = QuadraticFamily().sample(2, torch.Generator().manual_seed(0))
    rule = CoordinateWiseLSTM()
    lr = torch.tensor(1e-3)
    optimizer = torch.optim.Adam(rule.parameters(), lr=lr, betas=(0.9, 0.999))
    runner = GraphedTruncation(rule, optimizer, task, torch.ones(5), 1.0)
    runner._captured_settings = runner._settings()  # what a capture records
    lr.fill_(5e-4)
    assert not runner._settings_changed()  # same tensor: the graph reads its new value
    changes = [
        lambda: optimizer.param_groups[0].__setitem__("lr", torch.tensor(5e-4)),  # another tensor, same value
        lambda: optimizer.param_groups[0].__setitem__("betas", (0.5, 0.999)),
        lambda: optimizer.param_groups[0].__setitem__("weight_decay", 1e-2),
        lambda: setattr(runner, "clip_grad_norm", 2.0),
        lambda: setattr(rule, "kernel", "reference"),
    ]
    for change in changes:
        runner._captured_settings = runner._settings()
        change()
        assert runner._settings_changed()


def test_a_carry_that_does_not_fit_the_static_one_is_refused():
    task = QuadraticFamily().sample(4, torch.Generator().manual_seed(0))
    rule = CoordinateWiseLSTM()
    runner = GraphedTruncation(rule, torch.optim.Adam(rule.parameters()), task, torch.ones(5), 1.0)
    runner._load_carry(start(rule, task))  # allocates the static carry, as the first graphed call does
    other = QuadraticFamily().sample(2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"carry tensor 0 has shape \[2, 10\], the captured one \[4, 10\]"):
        runner._load_carry(start(rule, other))
    with pytest.raises(ValueError, match="carry tensor 0 has dtype torch.float64"):
        runner._load_carry(map_tensors(torch.Tensor.double, start(rule, task)))


class RandomBatchQuadraticTask(QuadraticTask):
    """Overrides sample_batch, declaring nothing: a noisy target each step."""

    def sample_batch(self, generator):
        return torch.randn(self.y.shape, generator=generator)


class FixedBatchQuadraticTask(RandomBatchQuadraticTask):
    """The same, declared to return one batch whatever the generator."""

    fixed_batches = True


def test_a_task_whose_batches_are_fixed_is_graphed_and_one_that_draws_minibatches_is_refused_saying_what_to_do(monkeypatch):
    """tangent-1d overrides sample_batch to return its full batch: a graph replays every step's data there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the checks read devices, they launch nothing
    cuda = torch.device("cuda", 0)
    tangent = get_task("tangent-1d").sample(2, torch.Generator().manual_seed(0))
    assert graph_unsupported_reason(tangent, None, cuda) is None
    base = QuadraticFamily().sample(2, torch.Generator().manual_seed(0))
    assert graph_unsupported_reason(FixedBatchQuadraticTask(base.W, base.y), None, cuda) is None
    # An override that declares nothing is taken to draw minibatches; ModuleTask declares it.
    mnist_like = ModuleFamily(lambda: nn.Linear(3, 2), lambda device: SupervisedData(
        torch.randn(8, 3), torch.zeros(8, dtype=torch.long), torch.randn(8, 3), torch.zeros(8, dtype=torch.long)), batch_size=4)
    for task, name in ((RandomBatchQuadraticTask(base.W, base.y), "RandomBatchQuadraticTask"),
                       (mnist_like.sample(1, torch.Generator().manual_seed(0)), "ModuleTask")):
        reason = graph_unsupported_reason(task, None, cuda)
        assert reason.startswith(f"{name} draws a new minibatch every step (its sample_batch) and a graph would replay "
                                 "the captured one"), reason
        assert "set fixed_batches = True on the class" in reason


def test_tangent_1d_trains_through_the_graph_runner_as_eagerly():
    """Off CUDA the runner falls back to eager truncations: what is checked is loading each epoch's instances."""
    config = dict(task="tangent-1d", epochs=2, instances=2, optimizee_steps=6, unroll=4, val_every=2, val_problems=2)
    eager = MetaTrainer(TrainConfig(device="cpu", **config))
    graphed = MetaTrainer(TrainConfig(device="cpu", **config))
    graphed.use_graphs = True  # what auto chooses on CUDA
    eager.run(progress=False)
    graphed.run(progress=False)
    assert graphed.graphed is not None
    assert [r["meta_loss"] for r in graphed.history] == pytest.approx([r["meta_loss"] for r in eager.history], rel=1e-6)
    for name, value in eager.rule.state_dict().items():
        torch.testing.assert_close(graphed.rule.state_dict()[name], value, rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_replays_of_tangent_1d_equal_eager_truncations():
    """A module task (vmap, jvp, autograd in the loss) captured: its full batch is rebuilt from the task's data."""
    graphs_match_eager_over_two_epochs(get_task("tangent-1d"), (10, 10), seed=4)

"""Every hand-designed rule matches torch.optim step for step on a small model."""

import math

import pytest
import torch
from torch import nn

from l2l.meta.evaluate import evaluate, tune_learning_rate
from l2l.optimizers import NAG, SGD, Adam, CoordinateWiseLSTM, Momentum, RMSProp, get_baseline

from gpu import CUDA, needs_cuda

CASES = [
    (SGD(lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    (Momentum(lr=0.05, beta=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    (NAG(lr=0.05, beta=0.9), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
    (RMSProp(lr=0.01, alpha=0.99, eps=1e-8), lambda p: torch.optim.RMSprop(p, lr=0.01, alpha=0.99, eps=1e-8)),
    (Adam(lr=0.01), lambda p: torch.optim.Adam(p, lr=0.01, foreach=False)),
    # What the benchmark tunes: get_baseline's defaults against torch.optim's (momentum 0.9 where torch has none).
    (get_baseline("sgd", 0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    (get_baseline("momentum", 0.05), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)),
    (get_baseline("nag", 0.05), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
    (get_baseline("rmsprop", 0.01), lambda p: torch.optim.RMSprop(p, lr=0.01)),
    (get_baseline("adam", 0.01), lambda p: torch.optim.Adam(p, lr=0.01)),
]
IDS = ["sgd", "momentum", "nag", "rmsprop", "adam"]
IDS += [f"get_baseline-{name}" for name in IDS]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1)).double()


@pytest.mark.parametrize("rule, make_torch_optimizer", CASES, ids=IDS)
def test_matches_torch_optim_step_for_step(rule, make_torch_optimizer):
    model = _model()
    reference = _model()
    inputs = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    targets = torch.randn(16, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    torch_optimizer = make_torch_optimizer(reference.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    state = rule.init_state(flat.numel(), dtype=flat.dtype)
    for _ in range(25):
        torch.nn.utils.vector_to_parameters(flat, model.parameters())
        model.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        grad = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
        update, state = rule(grad, state)
        flat = flat + update

        torch_optimizer.zero_grad()
        nn.functional.mse_loss(reference(inputs), targets).backward()
        torch_optimizer.step()
        expected = torch.cat([p.detach().reshape(-1) for p in reference.parameters()])
        torch.testing.assert_close(flat, expected, rtol=1e-12, atol=1e-12)


BATCHED = [
    (SGD(lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1)),
    (NAG(lr=0.05), lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True)),
    # A large eps, where inside or outside the square root (and before or after Adam's bias correction) differ.
    (RMSProp(lr=0.01, eps=0.1), lambda p: torch.optim.RMSprop(p, lr=0.01, eps=0.1)),
    (Adam(lr=0.01, eps=0.1), lambda p: torch.optim.Adam(p, lr=0.01, eps=0.1)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule, make_torch_optimizer", BATCHED, ids=["sgd", "nag", "rmsprop", "adam"])
def test_batched_instances_match_torch_optim_on_the_same_gradients(rule, make_torch_optimizer, dtype):
    generator = torch.Generator().manual_seed(0)
    params = torch.randn(3, 5, dtype=dtype, generator=generator)  # [instances, coordinates]
    reference = params.clone().requires_grad_(True)
    torch_optimizer = make_torch_optimizer([reference])
    state = rule.init_state(5, dtype=dtype)
    for _ in range(10):  # the first step checks the bias correction, the rest the running averages
        grad = torch.randn(3, 5, dtype=dtype, generator=generator) * 0.1
        update, state = rule(grad, state)
        params = params + update
        reference.grad = grad.clone()
        torch_optimizer.step()
        assert params.dtype == dtype
        torch.testing.assert_close(params, reference.detach(), rtol=0, atol=8 * torch.finfo(dtype).eps)


def test_rules_are_pure():
    grad = torch.randn(6)
    rule = Adam(lr=0.1)
    state = rule.init_state(6)
    first, _ = rule(grad, state)
    second, _ = rule(grad, state)
    assert torch.equal(first, second)
    assert state.count == 0 and torch.equal(state.mu, torch.zeros(6))


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: SGD(lr=-1.0), "Invalid learning rate: -1.0"),
        (lambda: SGD(lr=float("nan")), "Invalid learning rate"),
        (lambda: Adam(lr=0.0), "Invalid learning rate: 0.0"),
        (lambda: get_baseline("adam", True), "Invalid learning rate: True"),
        (lambda: Momentum(beta=1.0), "Invalid momentum value: 1.0"),
        (lambda: RMSProp(alpha=-0.1), "Invalid alpha value"),
        (lambda: RMSProp(eps=-1e-8), "Invalid epsilon value"),
        (lambda: Adam(beta2=1.5), "Invalid beta parameter at index 1"),
        (lambda: get_baseline("adagrad", 0.1), "unknown baseline optimizer 'adagrad'"),
    ],
)
def test_constructors_validate_arguments(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_a_zero_epsilon_is_accepted_as_torch_optim_accepts_it():
    grad = torch.tensor([0.5, -2.0])
    for rule in (RMSProp(lr=0.1, eps=0.0), Adam(lr=0.1, eps=0.0)):
        update, _ = rule(grad, rule.init_state(2))
        assert torch.isfinite(update).all()
    assert Adam(lr=0.1, eps=0.0)(grad, Adam().init_state(2))[0].tolist() == pytest.approx([-0.1, 0.1], rel=1e-6)  # lr * sign g on step 1


def test_tuning_picks_the_lowest_mean_final_loss_and_never_a_divergent_rate(quadratics):
    grid = (1e-4, 1e-2, 10.0)  # 10 diverges on these quadratics
    best, scores = tune_learning_rate(lambda lr: get_baseline("sgd", lr), quadratics, 30, grid)
    assert scores[10.0] == math.inf
    for lr in grid[:2]:
        assert scores[lr] == evaluate(SGD(lr=lr), quadratics, 30).losses[-1].double().mean().item()
    assert scores[1e-2] < scores[1e-4] and best == 1e-2


@pytest.mark.parametrize("grid, message", [((), "lr_grid must not be empty"), ((0.1, 0.1), "lr_grid lists 0.1 more than once")])
def test_tuning_refuses_a_grid_it_cannot_choose_from(quadratics, grid, message):
    with pytest.raises(ValueError, match=message):  # was 'min() iterable argument is empty', or one rate run twice
        tune_learning_rate(lambda lr: get_baseline("sgd", lr), quadratics, 3, grid)


def test_summaries_use_the_true_median_and_no_spread_for_one_instance():
    from l2l.meta.evaluate import RunResult, summarize

    four = summarize(RunResult(losses=torch.tensor([[4.0, 1.0, 3.0, 2.0]]), metrics={}, seconds=0.0))
    assert four["final_loss"]["median"] == 2.5  # torch.median would say 2.0
    one = summarize(RunResult(losses=torch.tensor([[5.0], [4.0]]), metrics={}, seconds=0.0))
    assert one["final_loss"]["sem"] is None and one["curve_sem"] == [None, None]
    assert one["final_loss"]["mean"] == 4.0


def test_when_every_rate_diverges_the_report_says_so(quadratics):
    from l2l.meta.evaluate import benchmark, format_table
    from l2l.tasks import QuadraticFamily

    report = benchmark(QuadraticFamily(), {}, baselines=("adam",), steps=20, problems=3, tune_problems=3,
                       lr_grid=(1e4, 0.01), seed=0, device=torch.device("cpu"))
    assert report["results"]["adam"]["tuning_diverged"] is False and report["results"]["adam"]["lr"] == 0.01
    all_diverged = benchmark(QuadraticFamily(), {}, baselines=("sgd",), steps=20, problems=3, tune_problems=3,
                             lr_grid=(1e4, 1e3), seed=0, device=torch.device("cpu"))
    result = all_diverged["results"]["sgd"]
    assert result["tuning_diverged"] is True and result["lr"] == 1e3  # the smallest, not the first listed
    assert "every learning rate on the grid diverged on the tuning instances" in format_table(all_diverged)


def test_a_single_rate_is_used_as_given_not_flagged_as_the_edge_of_a_search():
    from l2l.meta.evaluate import benchmark, format_table
    from l2l.tasks import QuadraticFamily

    def run(grid):
        return benchmark(QuadraticFamily(), {}, baselines=("adam",), steps=5, problems=2, tune_problems=2,
                         lr_grid=grid, seed=0, device=torch.device("cpu"))

    single = run((0.1,))
    assert single["results"]["adam"]["lr"] == 0.1 and single["results"]["adam"]["lr_at_grid_edge"] is False
    assert "edge of the grid" not in format_table(single)
    searched = run((0.1, 0.01))
    assert searched["results"]["adam"]["lr_at_grid_edge"] is True and "edge of the grid" in format_table(searched)


def test_learning_rate_scores_keep_close_rates_apart():
    from l2l.meta.evaluate import benchmark
    from l2l.tasks import QuadraticFamily

    report = benchmark(QuadraticFamily(), {}, baselines=("adam",), steps=5, problems=2, tune_problems=2,
                       lr_grid=(0.1, 0.1004, 0.3), seed=0, device=torch.device("cpu"))
    assert set(report["results"]["adam"]["lr_scores"]) == {"0.1", "0.1004", "0.3"}


@pytest.mark.parametrize("arguments, message", [
    (dict(lr_grid=()), "lr_grid must not be empty"),
    (dict(lr_grid=(0.1, -1.0)), "every learning rate in lr_grid must be a positive finite number, got -1.0"),
    (dict(lr_grid=(0.1, 0.1)), "lr_grid lists 0.1 more than once"),
    (dict(steps=0), "steps must be a positive integer, got 0"),
    (dict(problems=2.5), "problems must be a positive integer, got 2.5"),
    (dict(tune_problems=0), "tune_problems must be a positive integer, got 0"),
    # The tuned baseline's row silently replaced the learned rule's.
    (dict(learned={"adam": SGD(lr=0.1)}), "learned rule 'adam' has the name of a baseline; name it otherwise"),
])
def test_benchmark_arguments_are_checked_before_any_instance_is_drawn(arguments, message):
    from l2l.meta.evaluate import benchmark
    from l2l.tasks import QuadraticFamily

    defaults = dict(baselines=("adam",), steps=5, problems=2, tune_problems=2, lr_grid=(0.1,), seed=0, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=message):
        benchmark(QuadraticFamily(), **{"learned": {}, **defaults, **arguments})


@pytest.mark.parametrize("baselines, message", [
    (("adam", "lbfgs"), "unknown baseline 'lbfgs'; choose from sgd, momentum, nag, rmsprop, adam"),
    (("adam", "Adam"), "unknown baseline 'Adam' \\(did you mean 'adam'\\?\\)"),
    ("adam", "baselines must be a tuple such as \\('sgd', 'adam'\\), got 'adam'"),  # was "unknown baseline optimizer 'a'"
    (("adam", "adam"), "baselines lists one more than once: adam,adam"),  # tuned twice for one row
])
def test_baseline_names_are_checked_before_any_instance_is_drawn(monkeypatch, baselines, message):
    from l2l.meta.evaluate import benchmark
    from l2l.tasks import QuadraticFamily

    family = QuadraticFamily()
    monkeypatch.setattr(family, "sample", lambda *args: pytest.fail("instances drawn before the names were checked"))
    with pytest.raises(ValueError, match=message):  # was found after every learned rule had been evaluated
        benchmark(family, {"lstm": SGD(lr=0.1)}, baselines=baselines, steps=3, problems=2, tune_problems=2,
                  lr_grid=(0.1,), seed=0, device=torch.device("cpu"))


def test_the_table_says_how_many_instances_diverged():
    from l2l.meta.evaluate import RunResult, format_table, summarize

    def row(final, lr):
        losses = torch.tensor([[9.0, 9.0, 9.0, 9.0], final])
        return {"lr": lr, **summarize(RunResult(losses=losses, metrics={}, seconds=0.0))}

    report = {"task": "quadratic", "problems": 4, "steps": 1, "seed": 0, "tune_problems": 2,
              "results": {"adam": row([1.0, 2.0, 3.0, 4.0], 0.1), "sgd": row([1.0, math.inf, 3.0, math.nan], 0.1)}}
    assert report["results"]["sgd"]["diverged"] == 2
    sgd = next(line for line in format_table(report).splitlines() if line.startswith("sgd"))
    assert "diverged (2 of 4)" in sgd  # a bare 'diverged' read as every instance


def test_the_table_has_no_ratio_column_without_its_reference():
    from l2l.meta.evaluate import benchmark, format_table
    from l2l.tasks import QuadraticFamily

    report = benchmark(QuadraticFamily(), {}, baselines=("sgd",), steps=3, problems=2, tune_problems=2,
                       lr_grid=(0.1,), seed=0, device=torch.device("cpu"))
    table = format_table(report)
    assert "vs adam" not in table and "-  \n" not in table + "\n"  # was a column of '-' with Adam not run
    assert "vs sgd" in format_table(report, reference="sgd") and "1.000x" in format_table(report, reference="sgd")


def test_without_baselines_no_tuning_instances_are_drawn_or_mentioned(monkeypatch):
    from l2l.meta.evaluate import benchmark, format_table
    from l2l.tasks import QuadraticFamily

    family = QuadraticFamily()
    drawn = []
    sample = family.sample
    monkeypatch.setattr(family, "sample", lambda count, *rest: drawn.append(count) or sample(count, *rest))
    report = benchmark(family, {"lstm": SGD(lr=0.01)}, baselines=(), steps=3, problems=2, tune_problems=7,
                       lr_grid=(0.1,), seed=0, device=torch.device("cpu"))
    assert drawn == [2]  # not the 7 tuning instances as well
    assert "tuned" not in format_table(report)


class _RecordingLSTM(CoordinateWiseLSTM):
    """An LSTM that records every module it converts (``.to``, ``.cuda``, ``.double`` ... all go through ``_apply``)."""

    converted: list = []

    def _apply(self, fn, recurse=True):
        type(self).converted.append(self)
        return super()._apply(fn, recurse)


def test_benchmark_leaves_the_callers_learned_rule_where_it_was(monkeypatch):
    from l2l.meta.evaluate import benchmark
    from l2l.tasks import QuadraticFamily

    rule = _RecordingLSTM(seed=0)
    monkeypatch.setattr(_RecordingLSTM, "converted", [])
    before = {name: (value.clone(), value.data_ptr()) for name, value in rule.state_dict().items()}
    report = benchmark(QuadraticFamily(dim=3), {"lstm": rule}, baselines=(), steps=3, problems=2, tune_problems=2,
                       lr_grid=(0.1,), seed=0, device=torch.device("cpu"))
    assert report["results"]["lstm"]["final_loss"]["mean"] is not None
    # The caller's module is never converted (on a GPU benchmark that would move it there in place).
    assert not any(module is rule for module in _RecordingLSTM.converted)
    for name, value in rule.state_dict().items():
        assert torch.equal(value, before[name][0]) and value.data_ptr() == before[name][1], name


def test_a_rule_already_on_the_benchmark_device_is_not_copied_whatever_the_spelling_of_the_device(monkeypatch):
    from l2l.meta.evaluate import on_device, same_device

    rule = CoordinateWiseLSTM(seed=0)
    assert on_device(rule, torch.device("cpu:0")) is rule  # the CPU has one device, whatever its index
    # cuda without an index is the current CUDA device (checked without a GPU: only the comparison needs it).
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert same_device(torch.device("cuda"), torch.device("cuda", 1))
    assert same_device(torch.device("cuda", 1), torch.device("cuda"))
    assert not same_device(torch.device("cuda"), torch.device("cuda", 0))
    assert not same_device(torch.device("cuda"), torch.device("cpu"))
    assert same_device(torch.device("cuda", 0), torch.device("cuda", 0))


@pytest.mark.cuda
@needs_cuda
def test_a_cuda_benchmark_does_not_move_the_callers_cpu_rule_to_the_gpu():
    from l2l.meta.evaluate import benchmark
    from l2l.tasks import QuadraticFamily

    rule = CoordinateWiseLSTM(seed=0)
    on_cpu = benchmark(QuadraticFamily(dim=3), {"lstm": rule}, baselines=(), steps=3, problems=2, tune_problems=2,
                       lr_grid=(0.1,), seed=0, device=torch.device("cpu"))
    on_gpu = benchmark(QuadraticFamily(dim=3), {"lstm": rule}, baselines=(), steps=3, problems=2, tune_problems=2,
                       lr_grid=(0.1,), seed=0, device=CUDA)
    assert {value.device.type for value in rule.state_dict().values()} == {"cpu"}
    assert on_gpu["results"]["lstm"]["final_loss"]["mean"] == pytest.approx(on_cpu["results"]["lstm"]["final_loss"]["mean"], rel=1e-4)


def test_the_report_records_the_versions_and_each_learned_rules_kernel_and_its_table_counts_in_words(monkeypatch):
    import sys

    evaluation = sys.modules["l2l.meta.evaluate"]  # the package re-exports the function evaluate under that name
    from l2l.checkpoint import versions
    from l2l.meta.evaluate import benchmark, format_table
    from l2l.optimizers.grouped import PerGroupRule
    from l2l.tasks import QuadraticFamily

    report = benchmark(QuadraticFamily(dim=3), {"lstm": CoordinateWiseLSTM(seed=0)}, baselines=("sgd",),
                       steps=1, problems=1, tune_problems=1, lr_grid=(0.1,), seed=0, device=torch.device("cpu"))
    assert report["versions"] == versions() and report["versions"]["torch"] == torch.__version__
    assert report["results"]["lstm"]["kernel"] == "reference" and "kernel" not in report["results"]["sgd"]
    # A per-group rule whose groups take different paths names both (the CUDA choice faked: no GPU here).
    grouped = PerGroupRule({"conv": CoordinateWiseLSTM(seed=0), "fc": CoordinateWiseLSTM(seed=1)})
    grouped.rules["fc"].kernel = "fused"
    from l2l.kernels import dispatch

    monkeypatch.setattr(dispatch, "select_kernel", lambda kernel, rule, device: "fused" if kernel == "fused" else "reference")
    assert evaluation.kernel_taken(grouped, torch.device("cuda")) == "reference+fused"
    assert evaluation.kernel_taken(get_baseline("adam", 0.1), torch.device("cpu")) is None
    assert format_table(report).splitlines()[0] == (
        "quadratic: 1 held-out instance, 1 step, seed 0 (baseline lr tuned on 1 separate instance)")


def test_benchmarks_docstring_names_every_key_of_its_report():
    import inspect
    import re

    from l2l.meta.evaluate import benchmark
    from l2l.tasks import QuadraticFamily

    report = benchmark(QuadraticFamily(), {"lstm": CoordinateWiseLSTM()}, baselines=("adam",), steps=3, problems=2,
                       tune_problems=2, lr_grid=(0.1, 0.01), seed=0, device=torch.device("cpu"))
    returns = inspect.getdoc(benchmark).split("Returns:")[1].split("Raises:")[0]
    quoted = set(re.findall(r'"(\w+)"', returns))
    assert set(report) <= quoted, f"keys the docstring leaves out: {set(report) - quoted}"
    learned, baseline = report["results"]["lstm"], report["results"]["adam"]
    extra = set(baseline) - set(learned)  # what baselines add to summarize's figures
    assert extra <= quoted, f"baseline keys the docstring leaves out: {extra - quoted}"


def test_the_report_names_the_exact_grid_and_each_baselines_fixed_settings_and_round_trips_as_json():
    import json

    from l2l.meta.evaluate import benchmark
    from l2l.tasks import QuadraticFamily

    grid = (10 ** -4.5, 0.1, 1e8)  # 10**-4.5 is '3.16228e-05' as an lr_scores key: the grid was not recoverable
    report = benchmark(QuadraticFamily(), {}, baselines=("momentum", "adam"), steps=3, problems=1, tune_problems=2,
                       lr_grid=grid, seed=0, device=torch.device("cpu"))
    assert report["lr_grid"] == list(grid)
    assert report["results"]["momentum"]["hyperparameters"] == {"beta": 0.9}
    assert report["results"]["adam"]["hyperparameters"] == {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
    assert report["results"]["momentum"]["lr_scores"]["1e+08"] is None  # diverged, and strict JSON has no inf
    assert json.loads(json.dumps(report, allow_nan=False)) == report


def test_ratios_far_from_one_keep_their_significant_digits():
    from l2l.meta.evaluate import RunResult, format_table, summarize

    def row(final, lr):
        return {"lr": lr, **summarize(RunResult(losses=torch.tensor([[1.0, 1.0], final]), metrics={}, seconds=0.0))}

    report = {"task": "quadratic", "problems": 2, "steps": 1, "seed": 0, "tune_problems": 2,
              "results": {"adam": row([1e-2, 1e-2], 0.1), "lstm": row([2e-6, 2e-6], None), "sgd": row([3e4, 3e4], 0.1)}}
    lines = {line.split()[0]: line for line in format_table(report).splitlines()[3:]}
    assert "0.0002x" in lines["lstm"]  # was 0.000x: as if the learned rule reached 0
    assert "3e+06x" in lines["sgd"] and "1.000x" in lines["adam"]  # was 3000000.000x


def test_a_diverged_instance_has_no_held_out_accuracy():
    # NaN weights give NaN logits, whose argmax is class 0: a finite accuracy of chance level, reported as a result.
    from helpers import TinyMLPFamily
    from l2l.meta.evaluate import format_table, summarize

    task = TinyMLPFamily().sample(3, torch.Generator().manual_seed(0))
    diverged, fine = evaluate(SGD(lr=1e38), task, 4), evaluate(SGD(lr=0.1), task, 4)
    assert not torch.isfinite(diverged.losses[-1]).any()
    assert diverged.metrics["test_accuracy"].isnan().all() and diverged.metrics["test_loss"].isnan().all()
    assert torch.isfinite(fine.metrics["test_accuracy"]).all()
    report = {"task": "test-tiny-mlp", "problems": 3, "steps": 4, "seed": 0, "tune_problems": 3,
              "results": {"sgd": {"lr": 1e38, **summarize(diverged)}}}
    assert report["results"]["sgd"]["test_accuracy"] == {"mean": None}
    assert format_table(report).splitlines()[-1].split()[-1] == "diverged"  # the accuracy column

"""The task registry as a user meets it: unknown and misspelt names and options, option values from the command line."""

import functools
import pathlib
import re

import pytest
import torch

from l2l.cli import _task_options, main
from l2l.tasks import QuadraticFamily, get_task, list_tasks, register_task
from l2l.tasks.registry import _REGISTRY


@pytest.mark.parametrize(
    "name, suggestion",
    [
        ("quadrtic", "quadratic"),
        ("Quadratic", "quadratic"),
        ("mnist_gp", "mnist-gp"),
        ("cifar-10", "cifar10"),
        ("mnist40", "mnist-40"),
        ("MNIST-ReLU", "mnist-relu"),
        ("tangent1d", "tangent-1d"),
    ],
)
def test_a_misspelt_task_name_suggests_the_nearest_registered_one(name, suggestion):
    with pytest.raises(ValueError, match=rf"^unknown task '{name}' \(did you mean '{suggestion}'\?\); available tasks: .*quadratic"):
        get_task(name)


def test_a_name_near_no_task_gets_no_suggestion():
    with pytest.raises(ValueError) as error:
        get_task("resnet")
    assert "did you mean" not in str(error.value) and "available tasks: cifar10, " in str(error.value)


@pytest.mark.parametrize(
    "name, option, message",
    [
        ("quadratic", "dimm", "task 'quadratic' has no option 'dimm' (did you mean 'dim'?); its options are dim"),
        ("quadratic", "hidden", "task 'quadratic' has no option 'hidden'; its options are dim"),
        ("mnist-40", "hiden", "task 'mnist-40' has no option 'hiden' (did you mean 'hidden'?); its options are hidden, layers, "),
        ("mnist-gp", "epsilon", "task 'mnist-gp' has no option 'epsilon' (did you mean 'eps'?); its options are "),
        ("tangent-1d", "batch_size", "task 'tangent-1d' has no option 'batch_size'; its options are hidden, activation, weight"),
    ],
)
def test_an_unknown_option_is_named_with_the_nearest_one_and_the_tasks_options(name, option, message):
    with pytest.raises(ValueError) as error:
        get_task(name, **{option: 1})
    assert str(error.value).startswith(message)
    assert "__init__" not in str(error.value)  # Python's binding error says nothing a user typed


def test_a_type_error_inside_a_family_is_not_disguised_as_a_bad_option():
    class Broken(QuadraticFamily):
        def __init__(self, dim=10):
            super().__init__(dim)
            if dim != 10:
                len(dim)  # a bug in the family, not in the options

    register_task("test-broken-family", Broken, replace=True)
    try:
        with pytest.raises(TypeError, match="has no len"):
            get_task("test-broken-family", dim=3)
    finally:
        del _REGISTRY["test-broken-family"]


def test_a_family_whose_config_lists_an_option_its_factory_refuses_is_named_as_the_defect():
    # Checkpoints record config() and are rebuilt from it; "no option 'dim' (did you mean 'dim'?)" said nothing.
    class FixedDim(QuadraticFamily):
        def __init__(self):
            super().__init__(dim=4)  # config() still says dim=4

    register_task("test-fixed-dim", FixedDim, replace=True)
    try:
        with pytest.raises(ValueError, match=r"task 'test-fixed-dim' lists option 'dim' in its config\(\) but its factory "
                                             r"does not take it: config\(\) must return the keyword arguments"):
            get_task("test-fixed-dim", **get_task("test-fixed-dim").config())
    finally:
        del _REGISTRY["test-fixed-dim"]


@pytest.mark.parametrize(
    "text, value",
    [
        ("0.5", 0.5), (".5", 0.5), ("5.", 5.0), ("+2", 2), ("1e-3", 1e-3), ("-1", -1), ("inf", float("inf")),
        ("40", 40), ("true", True), ("null", None), ("relu", "relu"), ("[1, 2]", [1, 2]),
    ],
)
def test_task_option_values_are_read_as_numbers_wherever_python_reads_one(text, value):
    # JSON has no ".5", "5.", "+2" or "inf": those became strings, and eps=.5 was refused as "got str".
    parsed = _task_options([f"key={text}"])["key"]
    assert parsed == value and type(parsed) is type(value)


def test_a_number_json_cannot_read_reaches_the_family_as_a_number(capsys):
    assert main(["bench", "--task", "mnist-gp", "--task-option", "eps=inf", "--baselines", "sgd", "--steps", "1"]) == 2
    assert "Invalid eps: inf (must be finite)" in capsys.readouterr().err


def test_every_family_samples_the_same_instances_from_the_same_seed_and_leaves_the_global_rng_alone():
    for name, family in list_tasks().items():
        if not name.startswith(("quadratic", "tangent")):
            continue  # the others need datasets; tests/test_module_task.py covers module families
        state = torch.random.get_rng_state()
        first = family.sample(3, torch.Generator().manual_seed(4))
        again = family.sample(3, torch.Generator().manual_seed(4))
        other = family.sample(3, torch.Generator().manual_seed(5))
        assert torch.equal(torch.random.get_rng_state(), state), name
        assert torch.equal(first.init_params(), again.init_params()), name
        assert first.init_params().shape == (3, first.num_params), name
        batch = first.sample_batch(torch.Generator().manual_seed(0))
        assert torch.equal(first.loss(first.init_params(), batch), again.loss(again.init_params(), batch)), name
        assert not torch.equal(first.loss(first.init_params(), batch), other.loss(other.init_params(), batch)), name


@pytest.mark.parametrize("name", ["quadratic", "tangent-1d"])
@pytest.mark.parametrize("generator", [None, 5], ids=["None", "int"])
def test_sampling_without_a_cpu_generator_is_refused_rather_than_drawn_from_the_global_rng(name, generator):
    state = torch.random.get_rng_state()
    with pytest.raises(ValueError, match=r"^generator must be a CPU torch.Generator \(for example torch.Generator\(\).manual_seed\(0\)\)"):
        get_task(name).sample(2, generator)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_tangent_metrics_check_the_shape_of_the_parameters():
    task = get_task("tangent-1d").sample(2, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"expects params of shape \[K, n\] = \[2, 61\], got \[3, 61\]"):
        task.metrics(torch.zeros(3, task.num_params))


class NeedsDim(QuadraticFamily):
    def __init__(self, dim):
        super().__init__(dim)


@pytest.mark.parametrize(
    "name, factory, message",
    [
        ("", QuadraticFamily, "a task name must be a non-empty string without spaces or '/', got ''"),
        (3, QuadraticFamily, "a task name must be a non-empty string without spaces or '/', got 3"),
        ("my task", QuadraticFamily, "a task name must be a non-empty string without spaces or '/', got 'my task'"),
        ("runs/mine", QuadraticFamily, "a task name must be a non-empty string without spaces or '/', got 'runs/mine'"),
        ("test-not-callable", QuadraticFamily(), "the factory of task 'test-not-callable' must be callable"),
        ("test-needs-dim", NeedsDim, "the factory of task 'test-needs-dim' must build the family without arguments "
                                     "(list_tasks and `l2l tasks` build every family with its defaults): give dim a default"),
    ],
)
def test_a_registration_that_would_break_l2l_tasks_is_refused(name, factory, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        register_task(name, factory)
    assert name not in _REGISTRY
    assert main(["tasks", "--json"]) == 0


@pytest.mark.parametrize(
    "name, option, value, own, family",
    [
        ("mnist-40", "hidden", 20, 40, "mnist"),
        ("mnist-2layer", "layers", 1, 2, "mnist"),
        ("mnist-relu", "activation", "sigmoid", "relu", "mnist"),
        ("cifar5", "classes", 10, 5, "cifar10"),
        ("cifar2", "classes", 3, 2, "cifar10"),
    ],
)
def test_a_variant_refuses_its_defining_option_with_another_value_and_names_the_family_to_use(name, option, value, own, family):
    # mnist-40 with hidden=20 was plain mnist under mnist-40's name, in checkpoints and reports.
    with pytest.raises(ValueError) as error:
        get_task(name, **{option: value})
    message = str(error.value)
    assert message.startswith(f"task {name!r} is {family!r} with {option}={own!r}; {option}={value!r} contradicts it")
    assert f"--task {family} --task-option {option}={value}" in message
    # Its own value is no contradiction: config() records it, and checkpoints rebuild the family from config().
    variant = get_task(name, **{option: own})
    assert getattr(variant, option) == own and get_task(name, **variant.config()).config() == variant.config()


def test_an_invalid_value_of_a_variants_option_gets_the_familys_own_message():
    with pytest.raises(ValueError, match="^hidden must be a positive integer, got 0"):
        get_task("mnist-40", hidden=0)


def test_a_family_registered_under_another_name_carries_that_name_into_its_reports():
    # register_task("alias", QuadraticFamily) built families named "quadratic": their reports (and the checkpoints
    # of runs on them) recorded a task that get_task("alias") does not rebuild.
    from l2l.meta.evaluate import benchmark

    register_task("test-alias", QuadraticFamily)
    try:
        family = get_task("test-alias", dim=3)
        assert family.name == "test-alias" and list_tasks()["test-alias"].name == "test-alias"
        assert get_task("quadratic").name == QuadraticFamily.name == "quadratic"  # the class and its own name untouched
        report = benchmark(family, {}, baselines=("sgd",), steps=2, problems=2, tune_problems=2, lr_grid=(0.1,), seed=0,
                           device=torch.device("cpu"))
        assert report["task"] == "test-alias" and get_task(report["task"], **report["task_options"]).config() == {"dim": 3}
    finally:
        del _REGISTRY["test-alias"]


class _WithScale(QuadraticFamily):
    """A user family whose config() records an option as its __init__ holds it, whatever that is."""

    def __init__(self, dim=2, scale=1.0):
        super().__init__(dim)
        self.scale = scale

    def config(self):
        return {**super().config(), "scale": self.scale}


@pytest.mark.parametrize(
    "scale, shown",
    [
        (torch.tensor(2.0), "tensor(2.) (a Tensor)"),  # bench.json could not be written, after the whole comparison
        (pathlib.PurePosixPath("/data/x"), "PurePosixPath('/data/x') (a PurePosixPath)"),  # checkpoints written, then unreadable
        ((1, 2), "(1, 2) (a tuple)"),  # read back from JSON as a list, another value
        ([1, {"a": {1}}], "{1} (a set) in [1, {'a': {1}}]"),
        ({1: "a"}, "the key 1 (an int) in {1: 'a'}"),
    ],
)
def test_a_family_whose_config_is_not_json_data_is_refused_when_built_naming_the_option_and_the_fix(scale, shown):
    # Checkpoints, reports and --task-option hold config() as JSON: a tensor in it let a training run
    # finish and then failed writing its report; a path made its checkpoints unreadable.
    register_task("test-scale", _WithScale, replace=True)
    try:
        assert get_task("test-scale").config() == {"dim": 2, "scale": 1.0}
        with pytest.raises(ValueError) as error:
            get_task("test-scale", scale=scale)
        message = str(error.value)
        assert message.startswith(f"task 'test-scale': config() gives option 'scale' a value JSON cannot hold: {shown}")
        assert "str, int, float, bool, None" in message and "a tensor's .tolist()" in message
    finally:
        del _REGISTRY["test-scale"]


def test_training_a_family_whose_config_is_not_json_data_fails_before_any_epoch(tmp_path):
    from l2l import TrainConfig, meta_train

    register_task("test-scale", functools.partial(_WithScale, scale=(1, 2)), replace=True)  # its default: a tuple
    try:
        config = TrainConfig(task="test-scale", epochs=2, optimizee_steps=2, unroll=2,
                             instances=2, val_problems=2, hidden_size=2, num_layers=1)
        with pytest.raises(ValueError, match=r"^task 'test-scale': config\(\) gives option 'scale' a value JSON cannot hold"):
            meta_train(config, tmp_path / "run", progress=False)
    finally:
        del _REGISTRY["test-scale"]
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_a_family_whose_config_is_not_a_dict_of_named_options_is_refused():
    class Listed(QuadraticFamily):
        def config(self):
            return [("dim", self.dim)]

    register_task("test-listed", Listed, replace=True)
    try:
        with pytest.raises(ValueError, match=r"^task 'test-listed': config\(\) must return a dict of option names "
                                             r"\(str\) to values, got \[\('dim', 10\)\] \(a list\)"):
            get_task("test-listed")
    finally:
        del _REGISTRY["test-listed"]


def test_a_variant_registered_under_another_name_is_named_as_the_user_typed_it():
    from l2l.tasks.mnist import MNIST40Family

    register_task("test-m40", MNIST40Family)
    try:
        with pytest.raises(ValueError, match=r"^task 'test-m40' is 'mnist' with hidden=40; hidden=20 contradicts it: "
                                             r"use --task mnist --task-option hidden=20"):
            get_task("test-m40", hidden=20)
        with pytest.raises(ValueError, match=r"^task 'mnist-40' is 'mnist' with hidden=40"):
            get_task("mnist-40", hidden=20)  # under its own name, as before
    finally:
        del _REGISTRY["test-m40"]


@pytest.mark.parametrize("make", ["TrainConfig", "BenchConfig"])
def test_task_options_that_are_not_json_data_are_refused_by_the_run_configs(make):
    # TrainConfig took them, and meta_train then failed with "Object of type Tensor is not JSON serializable".
    import l2l.config

    with pytest.raises(l2l.config.ConfigError, match=r"^task_options gives option 'dim' a value JSON cannot hold: "
                                                     r"tensor\(3\) \(a Tensor\)\. .*for example a tensor's \.tolist\(\)"):
        getattr(l2l.config, make)(task="quadratic", task_options={"dim": torch.tensor(3)})
    with pytest.raises(l2l.config.ConfigError, match=r"^task_options must be a dict of option names \(str\) to values"):
        getattr(l2l.config, make)(task="quadratic", task_options={3: 1})

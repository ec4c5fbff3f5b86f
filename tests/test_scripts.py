"""The experiment scripts' command lines (scripts/): argument checks, where --train and the outputs go, the published-folder guard.

`l2l train` and `l2l bench` are replaced by a recorder and the repro scripts stop at their
argument checks, so nothing here trains, benchmarks or writes into the repo.
"""

import runpy
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"


@pytest.fixture
def run(monkeypatch, capsys):
    """``run(script, *argv)``: runs scripts/SCRIPT as __main__ with l2l's command line recorded, not run; returns the calls."""
    monkeypatch.syspath_prepend(str(SCRIPTS))
    monkeypatch.setenv("COLUMNS", "400")  # One help line per flag: paths are not wrapped.
    import _experiment

    calls = []
    monkeypatch.setattr(_experiment, "l2l", lambda argv: calls.append(argv) or 0)

    def run(script, *argv):
        monkeypatch.setattr(sys, "argv", [script, *argv])
        runpy.run_path(str(SCRIPTS / script), run_name="__main__")
        return calls

    return run


def usage_error(run, capsys, script, *argv):
    with pytest.raises(SystemExit) as stop:
        run(script, *argv)
    assert stop.value.code == 2
    return capsys.readouterr().err


def usage_help(run, capsys, script):
    with pytest.raises(SystemExit):
        run(script, "--help")
    return capsys.readouterr().out


def flag(call, name):
    return call[call.index(name) + 1]


@pytest.mark.parametrize("script, argv, named", [
    ("paper_quadratic.py", ["--problems", "0"], "--problems: expected a positive integer, got '0'"),
    ("paper_mnist.py", ["--problems", "-2"], "--problems: expected a positive integer, got '-2'"),
    ("paper_cifar.py", ["--tasks", "cifar10,svhn"], "--tasks: 'svhn' is not one of this script's tasks, cifar10,cifar5,cifar2 "
     "(the CIFAR-10-trained optimizer of section 3.3); give a comma-separated subset of them, got 'cifar10,svhn'"),
    ("paper_cifar.py", ["--tasks", "cifar_5"], "--tasks: 'cifar_5' is not one of this script's tasks (did you mean 'cifar5'?), "),
    ("paper_cifar.py", ["--tasks", "CIFAR-2"], "(did you mean 'cifar2'?)"),
    ("paper_cifar.py", ["--tasks", "mnist"], "--tasks: 'mnist' is not one of this script's tasks, cifar10,cifar5,cifar2 "),
    ("paper_cifar.py", ["--tasks", ","], "--tasks: expected a comma-separated subset of cifar10,cifar5,cifar2, got ','"),
    ("paper_cifar.py", ["--tasks", "cifar2,cifar2"], "--tasks: names cifar2 twice (each writes the same files), got 'cifar2,cifar2'"),
    # Given '' these read the current directory (--out, --runs-dir, --figures) or nothing at all (--data-dir).
    ("paper_quadratic.py", ["--data-dir", ""], "--data-dir: expected a path, got an empty string"),
    ("paper_mnist.py", ["--runs-dir", ""], "--runs-dir: expected a path, got an empty string"),
    ("paper_mnist.py", ["--out", ""], "--out: expected a path, got an empty string"),
    ("repro_tangent_prop.py", ["--data-dir", ""], "--data-dir: expected a path, got an empty string"),
    ("repro_tangent_prop.py", ["--figures", ""], "--figures: expected a path, got an empty string"),
    # A bad baseline failed only at cifar5, after the (long) cifar10 comparison.
    ("paper_cifar.py", ["--baselines", "adma"], "--baselines: unknown baseline 'adma' (did you mean 'adam'?); choose from "
     "sgd, momentum, nag, rmsprop, adam"),
    ("repro_tangent_prop.py", ["--seeds", "0"], "--seeds: expected a positive integer, got '0'"),
    ("repro_tangent_prop.py", ["--weight", "0"], "--weight: expected a positive number, got '0'"),
    # A stem '' wrote hidden .json/.png files; one with a folder wrote outside --results/--figures.
    ("repro_tangent_prop.py", ["--name", ""], "--name: expected a file name without folder or suffix (such as tangent_prop), got ''"),
    ("repro_tangent_prop.py", ["--name", "../x"], "--name: expected a file name without folder or suffix (such as tangent_prop), got '../x'"),
    ("repro_gradient_reversal.py", ["--eval-every", "0"], "--eval-every: expected a positive integer, got '0'"),
    ("repro_gradient_supervision.py", ["--weights", "0,1"], "--weights: expected comma-separated positive numbers, got '0,1'"),
    ("repro_gradient_supervision.py", ["--weights", ","], "--weights: expected comma-separated positive numbers, got ','"),
    ("repro_input_gradient_penalty.py", ["--pgd-steps", "-1"], "--pgd-steps: expected an integer >= 0, got '-1'"),
    # Minibatches are whole: fewer examples than one batch would train nothing at all.
    ("repro_input_gradient_penalty.py", ["--train-examples", "100"], "--batch-size 128 is more than --train-examples 100"),
    ("repro_gradient_reversal.py", ["--train-examples", "64", "--batch-size", "100"], "--batch-size 100 is more than --train-examples 64"),
    ("repro_gradient_supervision.py", ["--biased-examples", "10", "--epochs", "6"],
     "--epochs 6 x --biased-examples 10 is less than one --batch-size 64: no training step"),
])
def test_bad_arguments_are_usage_errors_naming_the_value(run, capsys, tmp_path, script, argv, named):
    assert named in usage_error(run, capsys, script, *argv, "--out", str(tmp_path))


def test_train_goes_to_runs_dir_whose_default_is_the_repos_runs(run, capsys, tmp_path):
    assert f"(default: {REPO / 'runs'})" in usage_help(run, capsys, "paper_quadratic.py")
    train, bench = run("paper_quadratic.py", "--train", "--out", str(tmp_path / "out"))
    assert train[0] == "train" and flag(train, "--out") == str(REPO / "runs" / "paper-quadratic")
    assert flag(bench, "--optimizer") == str(REPO / "runs" / "paper-quadratic" / "optimizer.pt")
    assert flag(bench, "--json") == str(tmp_path / "out" / "quadratic-100.json")
    train, *_ = run("relu_mnist.py", "--train", "--out", str(tmp_path / "out"), "--runs-dir", str(tmp_path / "runs"))[2:]
    assert flag(train, "--out") == str(tmp_path / "runs" / "mnist-relu-ft")


def test_help_shows_the_published_folders_as_defaults(run, capsys):
    assert f"(default: {REPO / 'benchmarks' / 'results'})" in usage_help(run, capsys, "paper_mnist.py")
    text = usage_help(run, capsys, "repro_gradient_reversal.py")
    assert f"(default: {REPO / 'benchmarks' / 'figures'})" in text and "(default: 50)" in text
    text = usage_help(run, capsys, "repro_input_gradient_penalty.py")  # as typed, not a Python tuple
    assert "(plain training is added) (default: 0.5,1,2,4)" in text and "(default: 0.5,1,2,3)" in text


def test_the_published_recipe_writes_the_published_files(run):
    (first, second, third) = run("paper_cifar.py")
    assert [flag(call, "--json") for call in (first, second, third)] == [
        str(REPO / "benchmarks" / "results" / f"{task}-100.json") for task in ("cifar10", "cifar5", "cifar2")]
    # As published: every baseline on cifar10, Adam alone on the subsets.
    assert "--baselines" not in first and flag(second, "--baselines") == flag(third, "--baselines") == "adam"
    assert flag(first, "--problems") == "8" and flag(first, "--seed") == "1"


@pytest.mark.parametrize("script, argv, changed", [
    ("paper_quadratic.py", ["--seed", "2"], "--seed 2 (published: 1)"),
    ("long_horizon_mnist.py", ["--problems", "8"], "--problems 8 (published: 16)"),
    ("paper_mnist_variants.py", ["--checkpoint", "mnist-relu"], "--checkpoint 'mnist-relu' (published: 'mnist')"),
    ("repro_tangent_prop.py", ["--seeds", "1"], "--seeds 1 (published: 3)"),
    ("repro_tangent_prop.py", ["--name", "tangent_prop_init1"], "--steps 6000 (published: 15000)"),
    ("repro_input_gradient_penalty.py", ["--figures", "/tmp/elsewhere", "--epochs", "1"], "--epochs 1 (published: 5)"),
])
def test_other_settings_may_not_replace_published_results(run, capsys, script, argv, changed):
    error = usage_error(run, capsys, script, *argv)
    assert "holds the published" in error or "hold the published" in error
    assert changed in error and "pass --out DIR" in error


def test_unpublished_names_may_not_go_into_the_published_folders(run, capsys):
    assert "no results named 'mine'" in usage_error(run, capsys, "repro_tangent_prop.py", "--name", "mine")


def test_other_settings_go_anywhere_else(run, tmp_path):
    (bench,) = run("paper_quadratic.py", "--seed", "2", "--problems", "3", "--out", str(tmp_path))
    assert flag(bench, "--seed") == "2" and flag(bench, "--problems") == "3"


def test_a_published_variant_passes_the_guard(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    import _objectives_repro

    tangent = runpy.run_path(str(SCRIPTS / "repro_tangent_prop.py"))
    monkeypatch.setattr(sys, "argv", ["repro_tangent_prop.py", "--init-scale", "1", "--steps", "15000", "--name", "tangent_prop_init1"])
    options = _objectives_repro.setup(tangent["arguments"](), tangent["RECIPES"])
    assert options.results == REPO / "benchmarks" / "results" and options.steps == 15000


def test_variants_script_has_no_training_flags(run, capsys):
    assert "unrecognized arguments: --train" in usage_error(run, capsys, "paper_mnist_variants.py", "--train")
    assert "--runs-dir" not in usage_help(run, capsys, "paper_mnist_variants.py")


def test_tangent_script_loss_is_the_tangent_1d_objective(monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPTS))
    from l2l.tasks.gradient_tasks import TANGENT_POINTS, TangentPropObjective
    from l2l.tasks.mnist import mlp

    loss = runpy.run_path(str(SCRIPTS / "repro_tangent_prop.py"))["loss"]
    torch.manual_seed(0)
    net = mlp(20, 1, "tanh", inputs=1, classes=1)
    x = torch.tensor(TANGENT_POINTS).unsqueeze(1)
    for weight in (0.0, 1.0, 3.0):
        ours, theirs = loss(net, x, weight), TangentPropObjective(weight)(net, x, x)
        grads = [torch.autograd.grad(value, list(net.parameters())) for value in (ours, theirs)]
        torch.testing.assert_close(ours, theirs)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("script", sorted(path.name for path in SCRIPTS.glob("*.py") if not path.name.startswith("_")))
def test_help_gives_the_data_directory_default_of_l2l(run, capsys, script):
    # The scripts hand --data-dir on to l2l (or read it as l2l does): without it, l2l's own fallbacks apply.
    from l2l.cli import build_parser

    train = next(action.choices["train"] for action in build_parser()._actions if getattr(action, "choices", None))
    expected = train._option_string_actions["--data-dir"].help
    line = next(line for line in usage_help(run, capsys, script).splitlines() if line.strip().startswith("--data-dir"))
    assert line.split("DATA_DIR", 1)[1].strip() == expected

"""The command line: train, bench (table and JSON of the documented form), tasks, clear errors."""

import json
import math
import subprocess
import sys

import pytest

from l2l.cli import main

NAMES = {"lstm", "sgd", "momentum", "nag", "rmsprop", "adam"}


def test_tasks_lists_each_family_with_its_default_steps_unroll_and_instances(capsys):
    assert main(["tasks"]) == 0
    rows = {line.split()[0]: line.split()[1:4] for line in capsys.readouterr().out.splitlines()[1:] if not line.startswith(" ")}
    assert rows["quadratic"] == ["100", "20", "128"] and rows["mnist"] == ["100", "20", "16"]  # K: what --instances defaults to
    assert main(["tasks", "--json"]) == 0
    cifar = next(row for row in json.loads(capsys.readouterr().out) if row["name"] == "cifar10")
    assert (cifar["steps"], cifar["unroll"], cifar["instances"]) == (100, 20, 4)


def test_tasks_shows_every_familys_options_with_their_defaults_as_task_options_take_them(capsys):
    # Only --json listed the options, yet the errors about a bad option point at them.
    from l2l.cli import _task_options
    from l2l.tasks import get_task, list_tasks

    assert main(["tasks"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert max(len(line) for line in lines if line.startswith(" ")) <= 100  # wrapped, not one long line per family
    shown: dict[str, list[str]] = {}
    name = ""
    for line in lines[1:]:
        if line.startswith(" "):
            shown[name] += line.split()
        else:
            name = line.split()[0]
            shown[name] = []
    assert shown["quadratic"] == ["options:", "dim=10"]
    assert {"hidden=40", "activation=sigmoid", "train_examples=null"} <= set(shown["mnist-40"])
    for name, family in list_tasks().items():
        assert shown[name][0] == "options:", name
        options = {} if shown[name] == ["options:", "none"] else _task_options(shown[name][1:])  # each one typed as --task-option KEY=VALUE rebuilds the defaults
        assert options == family.config() and get_task(name, **options).config() == family.config(), name


def test_train_then_bench_json_form(tmp_path, capsys):
    out = tmp_path / "run"
    status = main([
        "train", "--epochs", "3", "--instances", "8", "--optimizee-steps", "10", "--unroll", "5",
        "--val-every", "1", "--val-problems", "8", "--bench-problems", "16", "--out", str(out), "--quiet", "--device", "cpu",
    ])
    assert status == 0
    printed = capsys.readouterr().out
    assert "vs adam" in printed and "lstm" in printed
    assert (out / "optimizer.pt").is_file() and (out / "resume.pt").is_file() and (out / "bench.json").is_file()
    final = json.loads((out / "bench.json").read_text())  # of the form l2l bench writes, naming its checkpoint
    assert final["optimizer_labels"] == {"lstm": str(out / "optimizer.pt")} and final["optimizers"] == [str(out / "optimizer.pt")]

    report_path = tmp_path / "bench.json"
    status = main([
        "bench", "--task", "quadratic", "--optimizer", str(out / "optimizer.pt"), "--steps", "10", "--problems", "16",
        "--tune-problems", "8", "--seed", "7", "--json", str(report_path), "--quiet", "--device", "cpu",
    ])
    assert status == 0
    report = json.loads(report_path.read_text())
    assert report["task"] == "quadratic" and report["steps"] == 10 and report["problems"] == 16
    assert set(report["results"]) == NAMES
    for name, result in report["results"].items():
        assert (result["lr"] is None) == (name == "lstm")
        if name != "lstm":  # the tuned rate is the grid's best on the tuning instances
            scores = {float(lr): math.inf if score is None else score for lr, score in result["lr_scores"].items()}
            assert result["lr"] == pytest.approx(min(scores, key=scores.get), rel=1e-2)  # keys are rounded
        assert set(result["final_loss"]) == {"mean", "median", "sem"}
        assert len(result["curve_mean"]) == 11


def test_resume_continues_training(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--instances", "4", "--optimizee-steps", "4", "--unroll", "2", "--val-problems", "4", "--quiet", "--no-bench"]
    assert main(["train", "--epochs", "2", "--out", str(out), *common]) == 0
    assert main(["train", "--resume", str(out / "resume.pt"), "--epochs", "4", "--quiet", "--no-bench"]) == 0
    assert "trained 4 epochs" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--task", "quadratc"], "unknown task 'quadratc'"),
        (["bench", "--optimizer", "missing.pt"], "no checkpoint file 'missing.pt'"),
        (["train", "--epochs", "0"], "epochs must be a positive integer"),
        (["train", "--unroll", "30", "--optimizee-steps", "20"], "unroll (30) must not exceed optimizee_steps (20)"),
        (["bench", "--baselines", "adagrad"], "unknown baseline 'adagrad'; choose from sgd, "),
        (["bench", "--baselines", "adma"], "unknown baseline 'adma' (did you mean 'adam'?); choose from sgd, "),
    ],
)
def test_bad_input_gives_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_an_invalid_bench_option_is_refused_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--bench-problems", "0", "--out", str(tmp_path / "run")])
    assert exit_.value.code == 2 and "expected a positive integer, got '0'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_config_file_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "nope.json")]) == 2
    assert f"cannot read --config {tmp_path / 'nope.json'}: No such file or directory" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    for text, message in (("{", "is not valid JSON"), ("[1]", "must hold a JSON object of TrainConfig fields, found an array"),
                          ('{"device": 0}', "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 0")):
        bad.write_text(text)
        assert main(["train", "--config", str(bad)]) == 2
        assert message in capsys.readouterr().err


def test_resume_checks_a_config_file_like_flags(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--instances", "4", "--optimizee-steps", "4", "--unroll", "2", "--val-problems", "4", "--quiet", "--no-bench"]
    assert main(["train", "--epochs", "1", "--out", str(out), *common]) == 0
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps({"hidden_size": 99}))
    assert main(["train", "--resume", str(out / "resume.pt"), "--config", str(changed), "--quiet", "--no-bench"]) == 2
    assert "different configuration (hidden_size: checkpoint 20, asked 99)" in capsys.readouterr().err
    longer = tmp_path / "longer.json"
    longer.write_text(json.dumps({"epochs": 2}))  # a resumable field: the run continues to epoch 2
    assert main(["train", "--resume", str(out / "resume.pt"), "--config", str(longer), "--quiet", "--no-bench"]) == 0
    assert "trained 2 epochs" in capsys.readouterr().out


def test_a_closed_pipe_ends_quietly():
    # The reader closes its end before the interpreter has even started, so the first write fails.
    process = subprocess.Popen([sys.executable, "-m", "l2l", "tasks", "--json"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait() == 1
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_a_bench_whose_reader_goes_away_still_writes_its_report(tmp_path):
    # `l2l bench ... --json r.json | head -1`: the table is printed after the report is written.
    report = tmp_path / "r.json"
    process = subprocess.Popen([sys.executable, "-m", "l2l", "bench", "--optimizer", "quadratic", "--baselines", "adam",
                                "--lr-grid", "0.1", "--steps", "2", "--problems", "2", "--tune-problems", "2",
                                "--quiet", "--device", "cpu", "--json", str(report)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait() == 1, stderr
    assert json.loads(report.read_text())["results"].keys() == {"lstm", "adam"}


def test_module_entry_point_help():
    result = subprocess.run([sys.executable, "-m", "l2l", "bench", "--help"], capture_output=True, text=True, check=True)
    assert "--json OUT" in result.stdout


def test_a_fresh_run_never_overwrites_another_runs_checkpoints(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--instances", "4", "--optimizee-steps", "4", "--unroll", "2", "--val-problems", "4", "--quiet", "--no-bench"]
    assert main(["train", "--epochs", "1", "--out", str(out), *common]) == 0
    first = (out / "resume.pt").read_bytes()
    capsys.readouterr()
    assert main(["train", "--epochs", "2", "--seed", "5", "--out", str(out), *common]) == 2
    error = capsys.readouterr().err
    assert f"{out} already holds a training run (resume.pt, optimizer.pt, history.json)" in error
    assert f"l2l train --resume {out / 'resume.pt'}" in error and "--overwrite" in error
    assert (out / "resume.pt").read_bytes() == first
    # Resuming in place, and an explicit --overwrite, both write there.
    assert main(["train", "--resume", str(out / "resume.pt"), "--epochs", "2", "--quiet", "--no-bench"]) == 0
    assert main(["train", "--epochs", "1", "--seed", "5", "--overwrite", "--out", str(out), *common]) == 0
    assert "trained 1 epochs" in capsys.readouterr().out


def test_an_output_path_that_is_a_file_fails_before_training(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["train", "--epochs", "1", "--out", str(blocker), "--quiet", "--no-bench"]) == 2
    assert f"output directory {blocker} is a file; choose another --out" in capsys.readouterr().err
    assert main(["train", "--epochs", "1", "--out", str(blocker / "run"), "--quiet", "--no-bench"]) == 2
    assert f"cannot create the output directory {blocker / 'run'}" in capsys.readouterr().err


def test_a_checkpoint_of_another_task_is_a_warning_even_when_quiet(capsys):
    status = main(["bench", "--task", "quadratic", "--optimizer", "mnist", "--baselines", "", "--steps", "2",
                   "--problems", "2", "--quiet", "--device", "cpu"])
    assert status == 0
    assert "warning: mnist was trained on 'mnist', evaluated here on 'quadratic'" in capsys.readouterr().err


def test_a_checkpoint_of_the_same_task_with_other_options_is_a_warning(tmp_path, capsys):
    from helpers import sensitive_rule
    from l2l.checkpoint import save_use_checkpoint

    path = save_use_checkpoint(tmp_path / "dim3.pt", sensitive_rule(), {"task": "quadratic", "task_options": {"dim": 3}})
    common = ["bench", "--task", "quadratic", "--optimizer", str(path), "--baselines", "", "--steps", "2", "--problems", "2",
              "--quiet", "--device", "cpu"]
    assert main(common) == 0
    expected = (f"warning: {path} was trained on 'quadratic' with dim=3, evaluated here with dim=10 "
                "(give --task-option dim=3 to evaluate it on its own task)")
    assert expected in capsys.readouterr().err
    assert main([*common, "--task-option", "dim=3"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_bench_checks_its_output_paths_before_running(tmp_path, capsys):
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_text("")
    common = ["bench", "--steps", "3", "--problems", "2", "--tune-problems", "2", "--lr-grid", "0.1", "--baselines", "adam",
              "--quiet", "--device", "cpu"]
    assert main([*common, "--json", str(tmp_path / "adir")]) == 2
    assert f"--json {tmp_path / 'adir'} is a directory; give a file name" in capsys.readouterr().err
    assert main([*common, "--json", str(tmp_path / "afile" / "report.json")]) == 2  # --plot would need matplotlib first
    assert f"cannot create the directory of --json {tmp_path / 'afile' / 'report.json'}" in capsys.readouterr().err
    assert main([*common, "--lr-grid", "0.1,0.1000001"]) == 2
    assert "lr_grid lists 0.1 more than once" in capsys.readouterr().err


@pytest.mark.parametrize("name, message", [
    ("curves", "has no suffix to name its format"),  # was written to curves.png while saying 'figure written to curves'
    ("curves.xyz", "format 'xyz' is not supported"),  # was a failure after the whole benchmark
])
def test_bench_checks_the_figure_format_before_running(tmp_path, capsys, monkeypatch, name, message):
    pytest.importorskip("matplotlib")
    import l2l.cli

    monkeypatch.setattr(l2l.cli, "benchmark", lambda *args, **kwargs: pytest.fail("the benchmark ran"))
    assert main(["bench", "--baselines", "adam", "--quiet", "--device", "cpu", "--plot", str(tmp_path / name)]) == 2
    error = capsys.readouterr().err
    assert f"--plot {tmp_path / name}" in error and message in error and ".png" in error
    assert list(tmp_path.iterdir()) == []


def test_bench_refuses_one_file_for_the_report_and_the_figure(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import l2l.cli

    monkeypatch.setattr(l2l.cli, "benchmark", lambda *args, **kwargs: pytest.fail("the benchmark ran"))
    monkeypatch.chdir(tmp_path)  # the figure would have replaced the report just written
    assert main(["bench", "--quiet", "--device", "cpu", "--json", "out/r.png", "--plot", str(tmp_path / "out" / "r.png")]) == 2
    assert "--json and --plot name one file, out/r.png; give two" in capsys.readouterr().err


def test_plot_without_matplotlib_is_refused_before_running(tmp_path, capsys, monkeypatch):
    import importlib.util

    import l2l.cli

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "matplotlib" else real(name, *rest))
    monkeypatch.setattr(l2l.cli, "benchmark", lambda *args, **kwargs: pytest.fail("the benchmark ran"))
    assert main(["bench", "--quiet", "--device", "cpu", "--plot", str(tmp_path / "new" / "curves.png")]) == 2
    assert "--plot needs matplotlib: pip install 'l2l[plot]'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_bad_checkpoint_leaves_no_output_directory(tmp_path, capsys):
    report = tmp_path / "new" / "bench.json"
    assert main(["bench", "--optimizer", str(tmp_path / "missing.pt"), "--json", str(report), "--quiet"]) == 2
    assert "no checkpoint file" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # the --json directory is created once every input is known good


def test_a_failed_report_write_keeps_the_previous_report_and_is_one_clear_line(tmp_path, capsys, monkeypatch):
    import os

    path = tmp_path / "bench.json"
    path.write_text('{"previous": true}')

    def disk_full(descriptor):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)  # the data could not be put on disk
    status = main(["bench", "--steps", "3", "--problems", "2", "--tune-problems", "2", "--lr-grid", "0.1", "--baselines",
                   "adam", "--quiet", "--device", "cpu", "--json", str(path)])
    captured = capsys.readouterr()
    assert status == 2 and f"cannot write --json {path}: No space left on device" in captured.err
    assert "adam" in captured.out  # the table was printed before
    assert json.loads(path.read_text()) == {"previous": True} and list(tmp_path.iterdir()) == [path]


def test_a_figure_that_fails_to_draw_still_prints_the_table(tmp_path, capsys, monkeypatch):
    pytest.importorskip("matplotlib")
    import l2l.plotting

    def fails_to_draw(report, path, **kwargs):
        raise ValueError("Data cannot be log-scaled")  # what matplotlib raised for an all-diverged report

    monkeypatch.setattr(l2l.plotting, "plot_curves", fails_to_draw)
    status = main(["bench", "--steps", "3", "--problems", "2", "--tune-problems", "2", "--lr-grid", "0.1", "--baselines",
                   "adam", "--quiet", "--device", "cpu", "--plot", str(tmp_path / "curves.png")])
    captured = capsys.readouterr()
    # Raised outside l2l (matplotlib), so named by type with the L2L_DEBUG hint, status 1.
    assert status == 1 and "ValueError: Data cannot be log-scaled" in captured.err
    assert "adam" in captured.out  # the benchmark's results were lost with the figure


def test_two_checkpoints_with_one_file_name_get_two_rows(tmp_path, capsys):
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    train = ["train", "--epochs", "1", "--instances", "4", "--optimizee-steps", "4", "--unroll", "2", "--val-problems", "4",
             "--quiet", "--no-bench", "--device", "cpu"]
    assert main([*train, "--out", str(out_a)]) == 0
    assert main([*train, "--seed", "3", "--out", str(out_b)]) == 0
    report_path = tmp_path / "bench.json"
    status = main(["bench", "--optimizer", "quadratic", "--optimizer", str(out_a / "optimizer.pt"), "--optimizer",
                   str(out_b / "optimizer.pt"), "--steps", "3", "--problems", "2", "--tune-problems", "2", "--lr-grid", "0.1",
                   "--baselines", "", "--quiet", "--device", "cpu", "--json", str(report_path)])
    assert status == 0
    report = json.loads(report_path.read_text())
    assert set(report["results"]) == {"lstm", "lstm[optimizer]", "lstm[optimizer #3]"}
    assert report["optimizer_labels"]["lstm[optimizer #3]"] == str(out_b / "optimizer.pt")


def test_ctrl_c_before_the_first_checkpoint_does_not_point_at_a_missing_file(tmp_path, capsys, monkeypatch):
    import l2l.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(l2l.cli, "meta_train", interrupted)
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet", "--no-bench"]) == 130
    assert "interrupted before the first checkpoint" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "resume.pt").write_bytes(b"")
    assert main(["train", "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet", "--no-bench"]) == 130
    assert f"continue with: l2l train --resume {tmp_path / 'run' / 'resume.pt'}" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--baselines", ""], "nothing to compare: no --optimizer and --baselines ''"),
        (["bench", "--baselines", "sgd,sgd"], "baselines lists one more than once: sgd,sgd"),
        (["bench", "--task-option", "foo=1"], "task 'quadratic' has no option 'foo'; its options are dim (see `l2l tasks`)"),
    ],
)
def test_more_bad_bench_input_gives_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_directory_for_a_checkpoint_is_named_as_one(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path), "--quiet", "--no-bench"]) == 2
    assert f"checkpoint {tmp_path} is a directory; give the checkpoint file in it" in capsys.readouterr().err
    assert main(["bench", "--optimizer", str(tmp_path)]) == 2
    assert f"give the use checkpoint in it (for example {tmp_path / 'optimizer.pt'})" in capsys.readouterr().err


def test_a_bad_task_fails_before_the_output_directory_is_created(tmp_path, capsys):
    for extra in (["--task", "nope"], ["--task-option", "dim=0"]):
        assert main(["train", *extra, "--out", str(tmp_path / "run"), "--quiet", "--no-bench"]) == 2
        assert "error" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_directories_it_created(tmp_path, capsys):
    flags = ["--kernel", "fused", "--device", "cpu", "--epochs", "1", "--quiet", "--no-bench"]  # fails after the directories are made
    assert main(["train", *flags, "--out", str(tmp_path / "new" / "run")]) == 2
    assert "kernel='fused' cannot run" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()  # a directory the user made is theirs, even empty
    assert main(["train", *flags, "--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine").is_dir()


@pytest.mark.parametrize("flag", ["--out", "--config", "--resume", "--data-dir"])
def test_an_empty_path_is_a_usage_error_not_the_current_directory(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", flag, ""])
    assert exit_.value.code == 2 and f"argument {flag}: expected a path, got an empty string" in capsys.readouterr().err


def test_train_help_shows_no_python_none(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    assert "None" not in text and "one LSTM for every parameter" in text


def test_a_task_option_flag_overrides_one_option_of_the_config_file(tmp_path, capsys):
    from l2l.cli import build_parser, train_config

    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"task": "tangent-1d", "task_options": {"hidden": 8, "weight": 0.5}}))
    args = build_parser().parse_args(["train", "--config", str(config_file), "--task-option", "weight=2.0"])
    config, _ = train_config(args)
    assert config.task_options == {"hidden": 8, "weight": 2.0}  # hidden was dropped: the flag replaced the whole dict


def test_resuming_with_one_unchanged_task_option_keeps_the_others(tmp_path, capsys, monkeypatch):
    import l2l.cli as cli
    from l2l.config import TrainConfig

    saved = TrainConfig(task="tangent-1d", task_options={"hidden": 8, "weight": 0.5}, epochs=2)
    monkeypatch.setattr(cli, "config_from_resume", lambda path: saved)
    args = cli.build_parser().parse_args(["train", "--resume", str(tmp_path / "resume.pt"), "--task-option", "weight=0.5"])
    config, out = cli.train_config(args)
    assert config.task_options == saved.task_options and out == tmp_path  # was refused: "task_options: checkpoint ..."


def test_no_second_order_overrides_a_config_file_that_turns_it_on(tmp_path):
    from l2l.cli import build_parser, train_config

    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"second_order": True}))
    parse = build_parser().parse_args
    assert train_config(parse(["train", "--config", str(config_file)]))[0].second_order is True
    assert train_config(parse(["train", "--config", str(config_file), "--no-second-order"]))[0].second_order is False
    assert train_config(parse(["train", "--second-order"]))[0].second_order is True
    assert train_config(parse(["train"]))[0].second_order is False


def test_a_checkpoint_of_the_wrong_kind_names_the_flags_that_take_each(tmp_path, capsys):
    out = tmp_path / "run"
    tiny = ["--instances", "4", "--optimizee-steps", "2", "--unroll", "2", "--val-problems", "2", "--quiet", "--no-bench",
            "--device", "cpu"]
    assert main(["train", "--epochs", "1", "--out", str(out), *tiny]) == 0
    capsys.readouterr()
    assert main(["train", "--init-from", str(out / "resume.pt"), "--out", str(tmp_path / "b"), *tiny]) == 2
    error = capsys.readouterr().err
    assert "--init-from" in error and "optimizer.pt" in error  # said only --optimizer, a flag of l2l bench
    assert main(["train", "--resume", str(out / "optimizer.pt")]) == 2
    assert "--init-from" in capsys.readouterr().err  # the way to start a run from a use checkpoint's weights


def test_resume_accepts_a_family_default_given_explicitly(tmp_path, capsys):
    out = tmp_path / "run"
    tiny = ["--optimizee-steps", "2", "--unroll", "2", "--val-problems", "2", "--quiet", "--no-bench", "--device", "cpu"]
    assert main(["train", "--epochs", "1", "--out", str(out), "--task-option", "dim=3", *tiny]) == 0
    # K, the dimension and the unroll left to the family (128, 10 and 20 for quadratics) at the start, spelled out here.
    explicit = ["--instances", "128", "--task-option", "dim=3", "--unroll", "2"]
    assert main(["train", "--resume", str(out / "resume.pt"), "--epochs", "2", *explicit, "--quiet", "--no-bench"]) == 0
    assert "trained 2 epochs" in capsys.readouterr().out
    assert main(["train", "--resume", str(out / "resume.pt"), "--epochs", "3", "--instances", "64", "--quiet", "--no-bench"]) == 2
    assert "instances: checkpoint 128, asked 64" in capsys.readouterr().err


def test_an_empty_split_or_init_from_clears_the_config_files(tmp_path):
    from l2l.cli import build_parser, train_config

    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"task": "cifar10", "split": ["conv", "fc"], "init_from": "mnist"}))
    parse = build_parser().parse_args
    kept = train_config(parse(["train", "--config", str(config_file)]))[0]
    assert (kept.split, kept.init_from) == (("conv", "fc"), "mnist")
    cleared = train_config(parse(["train", "--config", str(config_file), "--split", "", "--init-from", ""]))[0]
    assert (cleared.split, cleared.init_from) == (None, None)
    assert train_config(parse(["train", "--config", str(config_file), "--split", "fc"]))[0].split == ("fc",)


def test_overwrite_removes_the_previous_runs_comparison_and_nothing_else(tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--epochs", "1", "--instances", "4", "--optimizee-steps", "4", "--unroll", "2", "--val-problems", "4",
              "--quiet", "--no-bench", "--device", "cpu"]
    assert main(["train", *common, "--out", str(out)]) == 0
    (out / "bench.json").write_text('{"results": "of the earlier run"}')  # as its final comparison wrote it
    (out / "notes.txt").write_text("the user's")
    assert main(["train", *common, "--seed", "5", "--overwrite", "--out", str(out)]) == 0
    # The earlier run's comparison described checkpoints that are gone; this run wrote none.
    assert sorted(path.name for path in out.iterdir()) == ["history.json", "notes.txt", "optimizer.pt", "resume.pt"]


def test_a_bench_that_fails_leaves_no_directories_it_created(tmp_path, capsys):
    common = ["bench", "--optimizer", "quadratic", "--kernel", "fused", "--steps", "2", "--problems", "2", "--baselines", "",
              "--quiet", "--device", "cpu"]  # fails at the first step, after the output paths were checked
    assert main([*common, "--json", str(tmp_path / "new" / "deeper" / "bench.json")]) == 2
    assert "kernel='fused' cannot run" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "mine").mkdir()  # a directory the user made is theirs, even empty
    assert main([*common, "--json", str(tmp_path / "mine" / "new" / "bench.json")]) == 2
    assert list(tmp_path.iterdir()) == [tmp_path / "mine"] and list((tmp_path / "mine").iterdir()) == []


def test_tuning_minibatches_are_no_seeds_evaluation_minibatches(capsys, monkeypatch):
    # The tuning runs drew their minibatches from the evaluation stream of seed + 1: a baseline's
    # learning rate for seed 3 was picked on the data every optimizer is evaluated on with seed 4.
    import importlib

    from l2l.seeding import make_generator

    evaluate = importlib.import_module("l2l.meta.evaluate")  # the package's `evaluate` is the function

    starts = []
    real_run = evaluate.run

    def run(rule, task, steps, *, generator=None):
        starts.append(generator.get_state().clone())  # the state each run's minibatch stream starts from
        return real_run(rule, task, steps, generator=generator)

    monkeypatch.setattr(evaluate, "run", run)
    assert main(["bench", "--baselines", "adam", "--lr-grid", "0.1,1", "--steps", "2", "--problems", "2",
                 "--tune-problems", "2", "--seed", "3", "--quiet", "--device", "cpu"]) == 0
    *tuning, evaluation = starts  # adam at both rates on the tuning instances, then on the evaluation instances
    assert len(tuning) == 2 and evaluation.equal(make_generator(3, "evaluate-batches").get_state())
    evaluation_streams = [make_generator(seed, "evaluate-batches").get_state() for seed in range(-5, 50)]
    assert not any(start.equal(stream) for start in tuning for stream in evaluation_streams)


@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_tasks_lists_the_other_families_when_one_cannot_be_built_and_marks_that_one(capsys, as_json):
    # A user family whose config() held a tensor made `l2l tasks` a TypeError traceback, listing nothing.
    import torch

    from l2l.tasks import QuadraticFamily, register_task
    from l2l.tasks.registry import _REGISTRY

    class Tensorial(QuadraticFamily):
        def config(self):
            return {"dim": torch.tensor(self.dim)}

    register_task("test-tensorial", Tensorial)
    try:
        assert main(["tasks", *(["--json"] if as_json else [])]) == 1
    finally:
        del _REGISTRY["test-tensorial"]
    captured = capsys.readouterr()
    reason = "config() gives option 'dim' a value JSON cannot hold: tensor(10) (a Tensor)"
    assert f"l2l tasks: error: task 'test-tensorial' cannot be built: task 'test-tensorial': {reason}" in captured.err
    if as_json:
        rows = {row["name"]: row for row in json.loads(captured.out)}
        assert rows["quadratic"]["options"] == {"dim": 10} and reason in rows["test-tensorial"]["error"]
    else:
        lines = captured.out.splitlines()
        assert any(line.startswith("quadratic ") for line in lines) and any(line.startswith("mnist ") for line in lines)
        bad = next(line for line in lines if line.startswith("test-tensorial "))
        assert "cannot be built" in bad and reason in bad


def test_a_path_flag_starting_with_a_tilde_means_the_home_directory(tmp_path, monkeypatch, capsys):
    # The shell leaves the tilde of --out=~/run (or a quoted "~/run") alone: l2l must expand it,
    # not create a folder named '~' in the working directory.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    common = ["--instances", "4", "--optimizee-steps", "4", "--unroll", "2", "--val-problems", "4", "--quiet", "--no-bench"]
    assert main(["train", "--epochs", "1", "--out=~/run", *common]) == 0
    assert (tmp_path / "home" / "run" / "resume.pt").is_file() and not (tmp_path / "~").exists()
    assert main(["train", "--resume=~/run/resume.pt", "--epochs", "2", "--init-from=~/run/optimizer.pt", *common[-2:]]) == 2
    assert "init_from: checkpoint None, asked" in capsys.readouterr().err  # the checkpoint was read: only init_from differs
    assert main(["bench", "--optimizer=~/run/optimizer.pt", "--steps", "4", "--problems", "4", "--tune-problems", "4",
                 "--baselines", "sgd", "--quiet", "--device", "cpu"]) == 0


TINY = ["--instances", "4", "--optimizee-steps", "4", "--unroll", "2", "--val-problems", "4", "--quiet", "--device", "cpu"]


def test_ctrl_c_during_a_benchmark_is_one_line_and_status_130(capsys, monkeypatch):
    # It was a KeyboardInterrupt traceback.
    import l2l.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(l2l.cli, "benchmark", interrupted)
    assert main(["bench", "--baselines", "adam", "--steps", "2", "--problems", "2", "--quiet", "--device", "cpu"]) == 130
    assert capsys.readouterr().err.strip() == "l2l bench: interrupted"


def test_ctrl_c_during_the_final_comparison_names_the_command_that_runs_it(tmp_path, capsys, monkeypatch):
    # The training was complete, yet the comparison's Ctrl-C was a traceback that said nothing of it;
    # and the bench command a run stopped in its last epoch printed compared on other instances
    # (seed 0, not --bench-seed's 1), for the family's steps and options, not the run's.
    import shlex

    import l2l.cli

    calls = []

    def benchmark(family, learned, **settings):
        calls.append((family.name, family.config(), {name: rule.state_dict() for name, rule in learned.items()}, settings))
        if len(calls) == 1:
            raise KeyboardInterrupt
        return {"results": {}}

    monkeypatch.setattr(l2l.cli, "benchmark", benchmark)
    monkeypatch.setattr(l2l.cli, "format_table", lambda report: "")
    out = tmp_path / "my run"
    assert main(["train", "--epochs", "2", *TINY, "--task-option", "dim=3", "--bench-problems", "8", "--bench-seed", "4",
                 "--out", str(out)]) == 130
    error = capsys.readouterr().err
    assert f"interrupted during the final comparison; training is complete ({out / 'optimizer.pt'}); run it with: " in error
    command = shlex.split(error.split("run it with: ")[1].strip())
    assert command[:2] == ["l2l", "bench"] and command[command.index("--json") + 1] == str(out / "bench.json")
    assert main(command[1:]) == 0
    (task, options, weights, settings), (task_again, options_again, weights_again, settings_again) = calls
    assert (task_again, options_again, settings_again) == (task, options, settings)  # the same comparison
    assert options == {"dim": 3} and (settings["steps"], settings["problems"], settings["seed"]) == (4, 8, 4)
    assert all(weights_again["lstm"][key].equal(value) for key, value in weights["lstm"].items())
    assert json.loads((out / "bench.json").read_text())["optimizer_labels"] == {"lstm": str(out / "optimizer.pt")}


def test_the_resume_command_a_stopped_run_prints_runs_as_printed(tmp_path, capsys, monkeypatch):
    # It was not quoted (a path with a space broke it) and dropped the run's --no-bench and --data-dir:
    # run as printed, it ran the 512-instance comparison the run was started without.
    import contextlib
    import shlex
    import signal

    import l2l.cli
    from l2l.meta import StopRequest

    class AfterOneEpoch(StopRequest):  # a Ctrl-C during the first epoch
        checks = 0

        @property
        def requested(self):
            self.checks += 1
            if self.checks == 2:
                self.request("SIGINT", signal.SIGINT)
            return self.reason is not None

    monkeypatch.setenv("L2L_DATA", str(tmp_path))  # restored afterwards: --data-dir sets it
    out = tmp_path / "my run"
    with monkeypatch.context() as patched:
        patched.setattr(l2l.cli, "stop_on_signals", lambda announce: contextlib.nullcontext(AfterOneEpoch()))
        assert main(["train", "--epochs", "3", *TINY, "--no-bench", "--data-dir", str(tmp_path / "data dir"),
                     "--out", str(out)]) == 130
    error = capsys.readouterr().err
    assert "SIGINT: stopped after epoch 1 of 3" in error
    command = shlex.split(error.split("continue with: ")[1].strip())
    assert command[:4] == ["l2l", "train", "--resume", str(out / "resume.pt")]
    assert "--no-bench" in command and command[command.index("--data-dir") + 1] == str(tmp_path / "data dir")
    assert main(command[1:]) == 0
    assert "trained 3 epochs" in capsys.readouterr().out
    assert not (out / "bench.json").exists()


def test_an_error_raised_outside_l2l_names_its_type_and_l2l_debug_shows_its_traceback(capsys, monkeypatch):
    # Every ValueError and RuntimeError was one line with status 2, and nothing gave the traceback a bug report needs.
    import l2l.cli

    def broken(*args, **kwargs):  # as torch raises, or a user's task family
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x1)")

    monkeypatch.setattr(l2l.cli, "benchmark", broken)
    argv = ["bench", "--baselines", "adam", "--steps", "2", "--problems", "2", "--quiet", "--device", "cpu"]
    assert main(argv) == 1
    assert capsys.readouterr().err.strip() == ("l2l bench: error: RuntimeError: mat1 and mat2 shapes cannot be multiplied "
                                               "(4x3 and 5x1) (set L2L_DEBUG=1 for the traceback)")
    assert main(["bench", "--task", "nope"]) == 2  # l2l's own refusal: no hint
    assert capsys.readouterr().err.strip().endswith("(see `l2l tasks`)")
    from l2l.data.base import DataError

    def missing_data(*args, **kwargs):  # l2l's own error types are refusals wherever raised (a user's family)
        raise DataError("MNIST not found in /nowhere")

    monkeypatch.setattr(l2l.cli, "benchmark", missing_data)
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == "l2l bench: error: MNIST not found in /nowhere"
    for error in (TypeError("unsupported operand type(s) for +: 'NoneType' and 'int'"), OSError(28, "No space left on device")):
        def raising(*args, error=error, **kwargs):  # a user's family's bug, a full disk: one line too, not a traceback
            raise error

        monkeypatch.setattr(l2l.cli, "benchmark", raising)
        assert main(argv) == 1
        assert capsys.readouterr().err.strip() == (f"l2l bench: error: {type(error).__name__}: {error} "
                                                   "(set L2L_DEBUG=1 for the traceback)")
    monkeypatch.setattr(l2l.cli, "benchmark", broken)
    monkeypatch.setenv("L2L_DEBUG", "1")
    with pytest.raises(RuntimeError, match="mat1 and mat2"):
        main(argv)
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        main(["bench", "--task", "nope"])


def test_bench_stdout_holds_the_table_alone(tmp_path, capsys):
    # `l2l bench ... --json r.json > table.txt` ended the table file with "report written to r.json".
    from l2l.meta.evaluate import format_table

    report = tmp_path / "r.json"
    assert main(["bench", "--optimizer", "quadratic", "--baselines", "adam", "--lr-grid", "0.1", "--steps", "2", "--problems", "2",
                 "--tune-problems", "2", "--device", "cpu", "--json", str(report)]) == 0
    captured = capsys.readouterr()
    assert captured.out == format_table(json.loads(report.read_text())) + "\n"
    assert f"report written to {report}" in captured.err and "tuning adam" in captured.err


def test_an_unknown_flag_is_named_by_its_command_with_that_commands_usage(capsys):
    # It was reported by the top-level parser, "l2l: error", with a usage line that lists no flag of train.
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--epochs", "1", "--bogus"])
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and "l2l train: error: unrecognized arguments: --bogus" in error
    assert error.startswith("usage: l2l train ")


def test_train_says_when_no_validation_was_finite(tmp_path, capsys):
    # Every validation diverges: the use checkpoint holds the starting weights, which the summary must say.
    from helpers import NaNAfterFamily  # registers it

    out = tmp_path / "run"
    assert main(["train", "--task", NaNAfterFamily.name, "--epochs", "1", "--instances", "2", "--optimizee-steps", "2",
                 "--unroll", "1", "--val-problems", "2", "--max-nonfinite", "5", "--out", str(out), "--quiet", "--no-bench"]) == 0
    captured = capsys.readouterr()
    assert "best validation loss inf" not in captured.out and "epoch -1" not in captured.out
    assert "no validation score was finite (every validation diverged: null in history.json), so optimizer.pt holds the weights " \
           "training started from (its fresh initialisation), not trained ones; 1 non-finite meta-steps skipped" in captured.out
    assert captured.err.count("no validation score was finite") == 0  # the summary says it; no second, Python-style warning

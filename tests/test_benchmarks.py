"""benchmarks/: the issue-target verdicts unroll_throughput.py prints and records for the CUDA path, and the
CPU path of the timing scripts at their smallest settings (what they print and write, ratios from the same run), and their usage errors."""

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
EXAMPLES = BENCHMARKS.parent / "examples"
PATH = BENCHMARKS / "unroll_throughput.py"


def script(name):
    folder = EXAMPLES if (EXAMPLES / f"{name}.py").exists() else BENCHMARKS
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(module, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", [f"{module.__name__}.py", *argv])
    module.main()


@pytest.fixture(scope="module")
def throughput():
    return script("unroll_throughput")


def report(inference=0.7, meta=0.4, speedup=5.0, kept=330.0, quadratic=12.0):
    sizes = []
    for n in (1_000_000, 10_000_000):
        sizes.append({"coordinates": n, "kernel": "reference", "meta_cs_per_s": 1e8})
        sizes.append({"coordinates": n, "kernel": "fused", "inference_roofline_fraction": inference,
                      "meta_roofline_fraction": meta, "meta_cs_per_s": 1e8 * speedup,
                      "meta_bytes_per_coordinate_step": kept})
    return {"sizes": sizes, "quadratic_iteration_s": {"reference": 0.012, "fused+graphs": 0.012 / quadratic}}


def verdicts(checks):
    return {check["target"]: check["met"] for check in checks}


def test_every_target_met(throughput):
    checks = throughput.targets(report())
    assert len(checks) == 1 + 2 * 3 + 1
    assert all(check["met"] is True for check in checks)


@pytest.mark.parametrize("field, value, missed", [
    ("inference", 0.59, "inference roofline fraction at 1e7"),
    ("meta", 0.34, "meta-training roofline fraction at 1e6"),
    ("speedup", 3.9, "meta-training fused / reference at 1e7"),
    ("kept", 401.0, "meta-training bytes kept per coordinate-step at 1e6"),
    ("quadratic", 9.5, "quadratic meta-iteration reference / fused+graphs"),
])
def test_each_threshold_is_enforced(throughput, field, value, missed):
    result = verdicts(throughput.targets(report(**{field: value})))
    assert result[missed] is False
    assert sum(met is False for met in result.values()) == (2 if field in ("meta", "speedup", "kept") else 1)


def test_a_figure_exactly_at_its_threshold_meets_it(throughput):
    # The issue says "at least" and "at most": equality passes.
    checks = throughput.targets(report(inference=0.60, meta=0.35, speedup=4.0, kept=400.0, quadratic=10.0))
    assert [check["value"] for check in checks] == [0.60] + [0.35, 4.0, 400.0] * 2 + [10.0]
    assert all(check["met"] is True for check in checks)


def test_figures_a_run_did_not_measure_are_not_judged(throughput):
    cpu_run = {"sizes": [{"coordinates": 1280, "kernel": "reference", "meta_cs_per_s": 2e5}],
               "quadratic_iteration_s": {"reference": 0.1}}
    checks = throughput.targets(cpu_run)
    assert [check["met"] for check in checks] == [None] * 5
    partial = report()
    partial["sizes"] = [row for row in partial["sizes"] if row["kernel"] == "fused"]  # reference skipped (memory)
    assert verdicts(throughput.targets(partial))["meta-training fused / reference at 1e6"] is None


def test_a_failing_row_is_recorded_and_a_run_cut_short_keeps_its_figures(throughput, monkeypatch, tmp_path):
    # The GPU session runs this once under a time limit: an out-of-memory row must not cost the
    # other rows, and a kill must not cost the rows already measured.
    import json
    import sys

    seconds = iter(range(1, 10_000))
    monkeypatch.setattr(throughput, "timer", lambda device: lambda fn, **kwargs: float(next(seconds)))
    monkeypatch.setattr(throughput, "ceilings", lambda device, seconds: {"copy_bandwidth_Bps": 1e12})

    def inference(rule, kernel, n, device, seconds):
        if n == 300:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 40.00 GiB")
        return 1e-3

    class Killed(BaseException):
        pass

    def killed(*args):
        raise Killed  # as `timeout` ends the step: nothing after this runs

    monkeypatch.setattr(throughput, "inference", inference)
    monkeypatch.setattr(throughput, "meta_training", lambda rule, n, steps, device, seconds: (2e-3, 0.0))
    monkeypatch.setattr(throughput, "quadratic_iteration", killed)
    out = tmp_path / "unroll.json"
    monkeypatch.setattr(sys, "argv", ["unroll_throughput.py", "--device", "cpu", "--sizes", "200,300,400", "--json", str(out)])
    with pytest.raises(Killed):
        throughput.main()
    rows = json.loads(out.read_text())["sizes"]
    assert [row["coordinates"] for row in rows] == [200, 300, 400]
    assert rows[1]["error"].startswith("OutOfMemoryError: CUDA out of memory") and "inference_s" not in rows[1]
    assert rows[0]["inference_cs_per_s"] == 200 / 1e-3 and rows[2]["meta_cs_per_s"] == 400 * 20 / 2e-3


def test_a_sweep_cut_short_keeps_the_settings_it_measured(throughput, monkeypatch, tmp_path):
    # The sweep is a step of the GPU session under a time limit; its JSON came only at the end.
    class Killed(BaseException):
        pass

    timed = iter(range(100))

    def inference(rule, kernel, n, device, seconds):
        if next(timed) == 2:
            raise Killed  # as `timeout` ends the step: nothing after this runs
        return 1e-3

    monkeypatch.setattr(throughput, "inference", inference)
    out = tmp_path / "sweep.json"
    monkeypatch.setattr(sys, "argv", ["unroll_throughput.py", "--device", "cpu", "--sweep", "--workers", "1",
                                      "--json", str(out)])
    with pytest.raises(Killed):
        throughput.main()
    rows = json.loads(out.read_text())
    assert [(row["kernel"], row["block"], row["maxnreg"]) for row in rows] == [("forward", 32, None), ("forward", 32, 128)]
    assert rows[0]["inference_cs_per_s"] == throughput.SWEEP_SIZES[0] / 1e-3


def test_meta_iteration_smoke(monkeypatch, tmp_path, capsys):
    out = tmp_path / "meta.json"
    run_main(script("meta_iteration"), monkeypatch, "--instances", "3", "--dim", "2", "--unroll", "2", "--repeats", "1",
             "--json", str(out))
    report = json.loads(out.read_text())
    seconds = report["seconds"]
    assert set(seconds) == {"batched", "per_parameter_loop"} and all(value > 0 for value in seconds.values())
    assert report["ratio"] == seconds["per_parameter_loop"] / seconds["batched"]
    printed = capsys.readouterr().out
    assert "batched path" in printed and "per-parameter loop" in printed and f"{report['ratio']:9.1f}x" in printed


def test_untracked_step_smoke_compares_the_same_bits(monkeypatch, tmp_path, capsys):
    from l2l.kernels import reference

    out = tmp_path / "untracked.json"
    untracked = reference._untracked
    run_main(script("untracked_step"), monkeypatch, "--workloads", "quadratic,dropin100", "--repeats", "1", "--steps", "2",
             "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [row["workload"] for row in rows] == ["quadratic", "dropin100"] and all(row["bit_identical"] for row in rows)
    assert all(row[clock]["before_s"] > 0 and row[clock]["after_s"] > 0 for row in rows for clock in ("wall", "cpu"))
    assert reference._untracked is untracked  # the script leaves the untracked path switched on
    assert "before/after" in capsys.readouterr().out


def test_compare_trees_worker_times_one_unit_per_request(monkeypatch, capsys):
    import argparse
    import io

    module = script("compare_trees")
    monkeypatch.setattr(sys, "stdin", io.StringIO("go\ngo\n"))
    module.worker(argparse.Namespace(unit="truncation", instances=2, dim=2, threads=torch.get_num_threads()))
    info, *seconds = capsys.readouterr().out.splitlines()
    module.check_imported_from(BENCHMARKS.parent, json.loads(info))  # this tree's l2l
    assert len(seconds) == 2 and all(float(value) > 0 for value in seconds)


def test_compare_trees_summary_and_refusal():
    module = script("compare_trees")
    figures = module.summarize([2.0, 3.0, 8.0], [1.0, 2.0, 2.0])  # paired ratios 2, 1.5, 4
    assert figures["median_paired_ratio"] == 2.0 and figures["ratio_of_medians"] == 1.5
    with pytest.raises(SystemExit, match="imported l2l from /elsewhere/l2l/__init__.py"):
        module.check_imported_from(BENCHMARKS.parent, {"l2l": "/elsewhere/l2l/__init__.py"})


def test_optimizer_step_smoke(monkeypatch, tmp_path, capsys):
    out = tmp_path / "step.json"
    run_main(script("optimizer_step"), monkeypatch, "--sizes", "1e3", "--repeats", "1", "--threads", "1", "--json", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert row["params"] == 4 * (15 * 15 + 15)  # four Linear(15, 15): the width closest to 1e3 parameters
    assert row["ratio_foreach"] == row["learned_s"] / row["adam_foreach_s"] and "adam_fused_s" not in row
    assert f"{row['params']:>11,}" in capsys.readouterr().out


def test_optimizer_step_cut_short_keeps_and_prints_the_sizes_it_measured(monkeypatch, tmp_path, capsys):
    # The GPU session's last step runs this under what is left of its budget: a kill during the
    # largest size lost every figure (the table and the JSON came only at the end).
    module = script("optimizer_step")

    class Killed(BaseException):
        pass

    calls = iter(range(100))

    def median_step_seconds(optimizer, repeats, device):
        if next(calls) == 3:  # the second size's learned step: as `timeout` ends the step
            raise Killed
        return 1e-3

    monkeypatch.setattr(module, "median_step_seconds", median_step_seconds)
    out = tmp_path / "step.json"
    with pytest.raises(Killed):
        run_main(module, monkeypatch, "--sizes", "1e3,2e3", "--repeats", "1", "--threads", "1", "--json", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert row["params"] == 4 * (15 * 15 + 15) and row["learned_s"] == 1e-3
    assert f"{row['params']:>11,}" in capsys.readouterr().out


def test_lstm_layout_smoke(monkeypatch, tmp_path, capsys):
    out = tmp_path / "layout.json"
    run_main(script("lstm_layout"), monkeypatch, "--sizes", "50,70", "--repeats", "1", "--threads", "1", "--json", str(out))
    rows = json.loads(out.read_text())
    assert [row["coordinates"] for row in rows] == [50, 70]
    assert all(row["speedup"] == row["coordinate_major_s"] / row["feature_major_s"] for row in rows)
    assert "feature-major" in capsys.readouterr().out


def test_module_vectorize_smoke(monkeypatch, tmp_path, capsys, real_data):
    module = script("module_vectorize")
    out = tmp_path / "vectorize.json"
    run_main(module, monkeypatch, "--threads", "1", "--repeats", "1", "--settings", "mnist:2", "--json", str(out))
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["task"], row["instances"]) == ("mnist", 2) and row["ratio"] == row["vmap"] / row["loop"]
    assert "mnist   2" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        run_main(module, monkeypatch, "--settings", "mnist")


def test_meta_training_times_no_memory_query_or_synchronisation(throughput, monkeypatch):
    # On CUDA the bytes kept are read in an untimed unroll: inside a timed run neither the allocator's
    # statistics nor a synchronisation may be called. The CUDA branch runs here on CPU tensors, with a
    # device that says "cuda" and those calls stubbed to fail inside a timing.
    import types

    from l2l.optimizers import CoordinateWiseLSTM

    inside = []

    def seconds(fn, warmup=0, repeats=1):
        inside.append(True)
        try:
            for _ in range(warmup + repeats):
                fn()
        finally:
            inside.pop()
        return 1e-3

    calls = []

    def outside_timings_only(name):
        def call(*args, **kwargs):
            assert not inside, f"torch.cuda.{name} inside a timed run"
            calls.append(name)
            return 0
        return call

    for name in ("synchronize", "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, outside_timings_only(name))
    on_cpu = throughput.DiagonalQuadratic
    monkeypatch.setattr(throughput, "DiagonalQuadratic", lambda k, n, device: on_cpu(k, n, torch.device("cpu")))
    cuda = types.SimpleNamespace(type="cuda")
    elapsed, kept = throughput.meta_training(CoordinateWiseLSTM(seed=0), 40, 3, cuda, seconds)
    assert elapsed == 1e-3 and kept == 0.0 and "max_memory_allocated" in calls
    calls.clear()
    assert throughput.meta_training(CoordinateWiseLSTM(seed=0), 40, 3, cuda, seconds, kept=False) == (1e-3, None)
    assert calls == []


def test_mnist_epoch_prints_the_memory_per_coordinate_step(monkeypatch, tmp_path, capsys):
    # Each K runs in its own process (an MNIST epoch takes seconds): the child's report is stood in for here.
    import types

    module = script("mnist_epoch")
    child = {"instances": 1, "coordinates": 15910, "optimizee_steps": 100, "unroll": 20, "seconds_per_epoch": 8.57,
             "peak_rss_bytes": 1.33 * 2**30, "peak_rss_growth_bytes": 520 * 2**20, "machine": "x86_64 CPU, 1 threads",
             "coordinate_steps_per_second": 15910 * 100 / 8.57, "bytes_per_coordinate_step": 520 * 2**20 / (15910 * 20)}
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        return types.SimpleNamespace(returncode=0, stdout="noise\n" + json.dumps(child) + "\n", stderr="")

    monkeypatch.setattr(module.subprocess, "run", run)
    out = tmp_path / "epoch.json"
    run_main(module, monkeypatch, "--instances", "1", "--epochs", "1", "--json", str(out))
    assert commands[0][-6:] == ["--device", "cpu", "--instances", "1", "--epochs", "1"]
    assert json.loads(out.read_text()) == [child]
    printed = capsys.readouterr().out
    assert "(100 steps, unroll 20)" in printed and "520 MiB" in printed and "1.7 KB" in printed  # RESULTS.md's K = 1 row


@pytest.mark.parametrize("name, argv", [
    ("distributed_training", ["--tasks", "mnist", "--accumulate", "", "--epochs", "1"]),
    ("mnist_epoch", ["--instances", "1", "--epochs", "1"]),
])
def test_a_failing_child_process_shows_why(monkeypatch, name, argv):
    # Each configuration runs in its own process: its error (here: the dataset missing) must reach
    # the user, not only "returned non-zero exit status 1".
    import subprocess

    module = script(name)
    real_run = subprocess.run
    failing = [sys.executable, "-c", "import sys; sys.exit('l2l.data.base.DataError: MNIST not found in /nowhere/mnist')"]
    monkeypatch.setattr(module.subprocess, "run", lambda command, **kwargs: real_run(failing, **kwargs))
    with pytest.raises(SystemExit) as stop:
        run_main(module, monkeypatch, *argv)
    assert "DataError: MNIST not found in /nowhere/mnist" in str(stop.value.code)


def test_kernel_variants_help_describes_it_and_measures_nothing(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports kernel_cache beside it
    module = script("kernel_variants")
    monkeypatch.setattr(module, "backward_variants", lambda sizes: pytest.fail("--help ran the count"))
    with pytest.raises(SystemExit) as stop:
        run_main(module, monkeypatch, "--help")
    assert stop.value.code == 0 and "compiled variants of the fused backward kernel" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stop:
        run_main(module, monkeypatch, "--sizes", "1000")
    assert stop.value.code == 2 and "unrecognized arguments: --sizes 1000" in capsys.readouterr().err


@pytest.mark.parametrize("name, argv, named", [
    ("meta_iteration", ["--repeats", "0"], "--repeats: expected a positive integer, got '0'"),
    ("lstm_layout", ["--repeats", "0"], "--repeats: expected a positive integer, got '0'"),
    ("module_vectorize", ["--repeats", "-1"], "--repeats: expected a positive integer, got '-1'"),
    ("mnist_epoch", ["--epochs", "0"], "--epochs: expected a positive integer, got '0'"),
    ("distributed_training", ["--processes", "0"], "--processes: expected a positive integer, got '0'"),
    ("compare_trees", ["--pairs", "0"], "--pairs: expected a positive integer, got '0'"),
    ("compare_trees", ["--threads", "0"], "--threads: expected a positive integer, got '0'"),
    ("compare_trees", ["--instances", "-2"], "--instances: expected a positive integer, got '-2'"),
    ("compare_trees", ["--dim", "0"], "--dim: expected a positive integer, got '0'"),
    # An unknown task failed only when its configuration ran, after the ones before it.
    ("distributed_training", ["--tasks", "quadratic,mnsit"],
     "--tasks: unknown task 'mnsit' (did you mean 'mnist'?); available tasks: cifar10, "),
    ("distributed_training", ["--tasks", ","], "--tasks: expected comma-separated task names (see `l2l tasks`), got ','"),
    ("precision_error", ["--coordinates", "0"], "--coordinates: expected a positive integer, got '0'"),
    ("unroll_throughput", ["--unroll", "0"], "--unroll: expected a positive integer, got '0'"),
    ("optimizer_step", ["--threads", "0"], "--threads: expected a positive integer, got '0'"),
    ("higher_meta_learning", ["--inner-steps", "0"], "--inner-steps: expected a positive integer, got '0'"),
    ("optimizer_step", ["--repeats", "0"], "--repeats: expected comma-separated positive integers (such as 1,4,16 or 1e5), got '0'"),
    ("higher_meta_learning", ["--meta-lr", "0"], "--meta-lr: expected a positive number, got '0'"),
    ("higher_meta_learning", ["--meta-lr", "nan"], "--meta-lr: expected a positive number, got 'nan'"),
    # A --json that cannot be written failed after the whole measurement; '' wrote nothing, silently.
    *[(name, ["--json", ""], "--json: expected a path, got an empty string") for name in
      ("compare_trees", "distributed_training", "lstm_layout", "meta_iteration", "mnist_epoch", "module_vectorize",
       "optimizer_step", "precision_error", "unroll_throughput")],
    ("meta_iteration", ["--json", "/nonexistent-l2l-dir/x.json"],
     "--json: cannot write /nonexistent-l2l-dir/x.json: its directory /nonexistent-l2l-dir does not exist; create it or give another path"),
    ("lstm_layout", ["--json", "/"], "--json: / is a directory; give a file name"),
    ("compare_trees", ["--base", ""], "--base: expected a path, got an empty string"),
    ("kernel_cache", ["build", "--workers", "0"], "--workers: expected a positive integer, got '0'"),
    ("kernel_cache", ["resources", "--json", ""], "--json: expected a path, got an empty string"),
    # An unknown device was a torch traceback, in distributed_training and mnist_epoch one per child process.
    *[(name, ["--device", "cdua"], "--device: expected a torch device (cpu, cuda, cuda:N, ...), got 'cdua'") for name in
      ("distributed_training", "meta_iteration", "mnist_epoch", "module_vectorize")],
    # Three sizes, two counts: the third size was skipped without a word.
    ("optimizer_step", ["--sizes", "1e3,1e4,1e5", "--repeats", "3,2"], "--repeats: 2 values for 3 --sizes"),
])
def test_bad_counts_are_usage_errors_naming_the_value(monkeypatch, capsys, name, argv, named):
    module = script(name)
    with pytest.raises(SystemExit) as stop:
        run_main(module, monkeypatch, *argv)
    assert stop.value.code == 2 and named in capsys.readouterr().err


LIST = "expected comma-separated positive integers (such as 1,4,16 or 1e5), got"


@pytest.mark.parametrize("name, argv", [
    ("lstm_layout", ["--sizes", "abc"]),  # each was a ValueError traceback, or ran with nonsense
    ("lstm_layout", ["--sizes", "0", "--repeats", "1"]),
    ("optimizer_step", ["--sizes", "1e3,-5", "--repeats", "1"]),
    ("optimizer_step", ["--sizes", "abc"]),
    ("mnist_epoch", ["--instances", "x"]),
    ("mnist_epoch", ["--instances", "1,,4"]),
    ("mnist_epoch", ["--instances", ""]),
    ("distributed_training", ["--accumulate", "2,x"]),
    ("distributed_training", ["--accumulate", "0"]),
    ("unroll_throughput", ["--sizes", "1e3,x"]),
    ("unroll_throughput", ["--sizes", "abc"]),
])
def test_bad_lists_are_usage_errors_naming_the_flag_and_the_form(monkeypatch, capsys, name, argv):
    module = script(name)
    with pytest.raises(SystemExit) as stop:
        run_main(module, monkeypatch, *argv)
    flag, value = argv[:2]
    assert stop.value.code == 2 and f"argument {flag}: {LIST} {value!r}" in capsys.readouterr().err


def test_list_flags_take_whole_numbers_in_e_notation():
    from l2l.cli import positive_int_list

    assert positive_int_list("1e3, 16000,2") == (1000, 16000, 2)
    assert positive_int_list("", empty=True) == ()  # distributed_training.py --accumulate '': no accumulation rows
    for text in ("1.5", "1e-3", "inf", "nan", "+", "2,", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="expected comma-separated positive integers"):
            positive_int_list(text)


def test_mnist_epoch_help_documents_its_thread_variable_and_a_bad_value_is_a_usage_error(monkeypatch, capsys):
    module = script("mnist_epoch")
    monkeypatch.setattr(module.subprocess, "run", lambda *args, **kwargs: pytest.fail("a measurement ran"))
    with pytest.raises(SystemExit) as stop:
        run_main(module, monkeypatch, "--help")
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    assert stop.value.code == 0 and "L2L_THREADS" in text and "(default: 2)" in text
    monkeypatch.setenv("L2L_THREADS", "0")  # was a traceback in each child, after the dataset had loaded
    with pytest.raises(SystemExit) as stop:
        run_main(module, monkeypatch, "--instances", "1")
    assert stop.value.code == 2 and "L2L_THREADS: expected a positive integer, got '0'" in capsys.readouterr().err

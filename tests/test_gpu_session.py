"""The prepared GPU-session script runs its steps within its budget and writes its log (checked on the CPU)."""

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def run_session(tmp_path, **env):
    variables = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "DEVICE": "cpu", **env}
    return subprocess.run(["bash", str(SCRIPT)], env=variables, capture_output=True, text=True, timeout=120)


def test_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_env_step_reports_the_versions_and_succeeds(tmp_path):
    result = run_session(tmp_path, STEPS="env")
    log = (tmp_path / "session.log").read_text()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "torch " in log and "triton " in log and "== env: exit 0" in log
    assert "0 steps failed or skipped" in log


def test_unknown_step_is_refused_before_anything_runs(tmp_path):
    result = run_session(tmp_path, STEPS="env bogus")
    assert result.returncode == 2
    assert "unknown step 'bogus'" in result.stderr
    assert not (tmp_path / "session.log").exists()


def test_steps_beyond_the_budget_are_skipped_and_named(tmp_path):
    result = run_session(tmp_path, STEPS="env unroll", BUDGET_S="0")
    log = (tmp_path / "session.log").read_text()
    assert result.returncode == 1
    assert "SKIPPED env" in log and 'rerun with STEPS="unroll ...")' in log
    assert "2 steps failed or skipped: env(skipped) unroll(skipped)" in log


def test_cache_step_without_a_gpu_installs_nothing_and_succeeds(tmp_path):
    result = run_session(tmp_path, STEPS="cache")
    log = (tmp_path / "session.log").read_text()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "kernel cache: no GPU here, nothing to install" in log
    assert "== cache: exit 0" in log and "Triton's cache gained 0 kernels" in log


def test_tests_step_names_each_test_and_where_a_slow_one_hangs(tmp_path):
    """The CUDA tests run once under the step's limit: a kill must not cost which tests passed, nor where one hung.

    With ``-q`` the log had only dots until pytest's final summary, so a step ended by its limit
    said neither which tests had passed nor which one was stuck, and without a per-test limit
    one hung test held its xdist worker, and so the step, until the step's limit.
    """
    repo = tmp_path / "repo"
    (repo / "benchmarks").mkdir(parents=True)
    shutil.copy(SCRIPT, repo / "benchmarks" / "gpu_session.sh")
    (repo / "tests").mkdir()
    (repo / "pytest.ini").write_text("[pytest]\nmarkers =\n    cuda: needs a CUDA device\n")
    (repo / "tests" / "test_fake_cuda.py").write_text(
        "import time\nimport pytest\n\n"
        "@pytest.mark.cuda\ndef test_quick():\n    pass\n\n"
        "@pytest.mark.cuda\ndef test_slow():\n    time.sleep(2.5)\n"
    )
    out = tmp_path / "out"
    variables = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "DEVICE": "cpu", "STEPS": "tests",
                 "TEST_TIMEOUT_S": "1"}
    result = subprocess.run(["bash", str(repo / "benchmarks" / "gpu_session.sh")], env=variables,
                            capture_output=True, text=True, timeout=120)
    log = (out / "session.log").read_text()
    assert "test_fake_cuda.py::test_quick PASSED" in log, log
    assert "Timeout" in log and "in test_slow" in log, log  # the stuck test's stack, at its limit
    # Where pytest-timeout is installed (the GPU machine) the slow test fails at its limit; else it only logs its stack.
    assert result.returncode == (1 if importlib.util.find_spec("pytest_timeout") else 0), log


def unmarked_cuda_tests(directory: Path) -> list[str]:
    """Tests in ``directory`` that skip without CUDA but lack ``@pytest.mark.cuda``, as ``file::name``.

    A test skips without CUDA through ``needs_cuda``/``needs_cuda_and_triton`` (tests/gpu.py) or a
    ``skipif`` on ``torch.cuda.is_available()``; a module-level ``pytestmark`` may carry the mark.
    """
    found = []
    for path in sorted(directory.glob("test_*.py")):
        tree = ast.parse(path.read_text())
        module_marks = "".join(ast.unparse(node.value) for node in tree.body if isinstance(node, ast.Assign)
                               and any(getattr(target, "id", None) == "pytestmark" for target in node.targets))
        for node in ast.walk(tree):
            if not (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test")):
                continue
            decorators = [ast.unparse(decorator) for decorator in node.decorator_list]
            skips = any("needs_cuda" in d or ("skipif" in d and "cuda.is_available" in d) for d in decorators)
            if skips and "pytest.mark.cuda" not in decorators and "pytest.mark.cuda" not in module_marks:
                found.append(f"{path.name}::{node.name}")
    return found


def test_every_test_that_needs_cuda_is_selected_by_the_sessions_cuda_marker(tmp_path):
    """The session's tests step runs ``pytest -m cuda``: a CUDA test without the mark skips here and never runs there."""
    assert "pytest -v -m cuda" in SCRIPT.read_text()
    assert unmarked_cuda_tests(Path(__file__).resolve().parent) == []
    # The scan finds both ways of skipping, and takes a module's pytestmark as the mark.
    (tmp_path / "test_a.py").write_text(
        "@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')\ndef test_skipif():\n    pass\n\n"
        "@needs_cuda\ndef test_helper_mark():\n    pass\n\n"
        "@pytest.mark.cuda\n@needs_cuda\ndef test_marked():\n    pass\n")
    (tmp_path / "test_b.py").write_text("pytestmark = [pytest.mark.cuda]\n\n@needs_cuda\ndef test_module_marked():\n    pass\n")
    assert unmarked_cuda_tests(tmp_path) == ["test_a.py::test_skipif", "test_a.py::test_helper_mark"]

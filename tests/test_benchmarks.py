"""The issue-target verdicts that benchmarks/unroll_throughput.py prints and records for the CUDA path."""

import importlib.util
from pathlib import Path

import pytest
import torch

PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "unroll_throughput.py"


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("unroll_throughput", PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

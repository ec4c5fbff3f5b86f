"""benchmarks/kernel_cache.py: launches captured without a GPU, compiled for sm_90, installed under the target machine's own cache keys."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from l2l.kernels import fused

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(fused.triton_version() is None, reason="Triton is not installed")


@pytest.fixture(scope="module")
def kernel_cache():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import kernel_cache
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return kernel_cache


def launch(n, backward=True):
    from l2l.optimizers import CoordinateWiseLSTM

    def run():
        rule = CoordinateWiseLSTM(seed=0, kernel="fused")
        grad = torch.randn(n, requires_grad=True)
        h, c = rule.init_state(n)
        update, h_new, c_new = fused.forward(rule, grad, h, c)
        if backward:
            (update.sum() + h_new.sum() + c_new.sum()).backward()
    return run


def kernels_and_constants(variants):
    """(kernel, constants) of each captured variant, for readable assertions."""
    rows = []
    for specialization in variants:
        data = json.loads(specialization)
        rows.append((data["name"].split(".")[-1], tuple(data["constant_vals"])))
    return sorted(rows)


def test_capture_records_forward_and_backward_variants_and_runs_nothing(kernel_cache):
    variants = kernel_cache.capture([("forward + backward", launch(37))])
    assert [name for name, _ in kernels_and_constants(variants)] == ["lstm_backward_kernel", "lstm_forward_kernel"]
    assert all(workloads == {"forward + backward"} for workloads in variants.values())
    # Another size of the same class (not 1, not a multiple of 16): no new variant.
    assert kernel_cache.capture([("again", launch(53))]).keys() == variants.keys()
    # n = 1 is specialised (constant 1): a different forward variant.
    assert kernel_cache.capture([("one", launch(1, backward=False))]).keys().isdisjoint(variants.keys())
    # The capture left nothing behind: the fused path is unavailable on the CPU again.
    assert fused.unavailable_reason("cpu") is not None


def test_stand_in_sizes_specialise_like_the_sizes_they_replace(kernel_cache):
    for n in (40_000, 40_008, 40_013, 10_000_000):
        stand_in = kernel_cache.stand_in_size(n)
        assert stand_in <= kernel_cache.LARGEST_CAPTURED and stand_in % 16 == n % 16
    for n in (40_000, 40_008, 40_013):  # small enough to capture at the real size too
        real = kernel_cache.capture([("real", launch(n))])
        assert kernel_cache.capture([("stand-in", launch(kernel_cache.stand_in_size(n)))]).keys() == real.keys()


def settings(variants):
    """(kernel, num_warps, maxnreg, BLOCK, PRECISION, DW_SCRATCH or None) of each variant."""
    rows = set()
    for specialization in variants:
        data = json.loads(specialization)
        constants = dict(zip((key[0] for key in data["constant_keys"]), data["constant_vals"]))
        names = [name for name, kind in data["signature"].items() if kind == "constexpr"]
        by_name = {name: constants[index] for index, name in enumerate(data["signature"]) if name in names}
        rows.add((data["name"].split(".")[-1], data["options"]["num_warps"], data["options"]["maxnreg"],
                  by_name["BLOCK"], by_name["PRECISION"], by_name.get("DW_SCRATCH")))
    return rows


def test_the_benchmark_workloads_launch_every_setting_they_time(kernel_cache):
    workloads = dict(kernel_cache.session_workloads())
    assert list(workloads) == ["unroll_throughput tf32x3", "unroll_throughput tf32", "unroll_throughput --sweep",
                               "optimizer_step", "CUDA tests"]
    swept = settings(kernel_cache.capture([("sweep", workloads["unroll_throughput --sweep"])]))
    forward = {(warps, maxnreg, block) for kernel, warps, maxnreg, block, _, _ in swept if kernel == "lstm_forward_kernel"}
    backward = {(warps, block, scratch) for kernel, warps, _, block, _, scratch in swept if kernel == "lstm_backward_kernel"}
    assert forward == {(warps, maxnreg, block) for block, warps in ((32, 4), (64, 4), (64, 8), (128, 4), (128, 8))
                       for maxnreg in (None, 128)}
    assert backward == {(warps, block, scratch) for block, warps in ((16, 4), (16, 8), (32, 4), (32, 8))
                        for scratch in (True, False)}
    assert {precision for *_, precision, _ in swept} == {"tf32x3"}
    main_run = settings(kernel_cache.capture([("tf32", workloads["unroll_throughput tf32"])]))
    assert {(kernel, precision) for kernel, _, _, _, precision, _ in main_run} == {
        ("lstm_forward_kernel", "tf32"), ("lstm_backward_kernel", "tf32")}


ELSEWHERE = """
import json, sys
sys.path.insert(0, {benchmarks!r})
import triton.runtime.cache as triton_cache
from triton import knobs
# Another libtriton build (the GPU machine's Python 3.12 wheel) gives other cache keys.
original = triton_cache.triton_key
triton_cache.triton_key = lambda: "another libtriton build " + original()
import kernel_cache
with kernel_cache.offline_driver():
    if {install!r}:
        print(json.dumps([kernel_cache.install(kernel_cache.Path({build!r})) for _ in range(2)]))
    else:  # a real launch: the JIT binds the arguments, looks the variant up, then has no GPU to run it on
        hits = []
        knobs.compilation.listener = lambda *, cache_hit, **unused: hits.append(cache_hit)
        import torch
        from l2l.kernels import fused
        from l2l.optimizers import CoordinateWiseLSTM
        fused._interpreted = lambda device: False
        rule = CoordinateWiseLSTM(seed=0)
        h, c = rule.init_state(37)
        try:
            fused.lstm_step_(rule, torch.randn(37), h, c)
        except Exception:
            pass
        print(json.dumps(hits))
"""


def test_build_then_install_elsewhere_hits_the_cache_at_launch(kernel_cache, tmp_path):
    from l2l.optimizers import CoordinateWiseLSTM

    def step(n=37):
        rule = CoordinateWiseLSTM(seed=0)
        h, c = rule.init_state(n)
        fused.lstm_step_(rule, torch.randn(n), h, c)

    variants = kernel_cache.capture([("step", step)])
    assert len(variants) == 1
    build = tmp_path / "build"
    manifest = kernel_cache.build(build, workers=1, variants=variants)
    assert [entry["kernel"] for entry in manifest["entries"]] == ["lstm_forward_kernel"]
    assert (build / manifest["entries"][0]["cubin"]).stat().st_size > 5_000  # gzipped
    (row,) = kernel_cache.resources(build)  # read back from the cubin with cuobjdump
    assert (row["kernel"], row["precision"], row["block"], row["warps"], row["workloads"]) == (
        "forward", "tf32x3", 64, 4, ["step"])
    assert 0 < row["registers"] <= 255 and row["stack_bytes"] >= 0 and row["flags"] == []
    env = {"PATH": "/usr/bin:/bin", "TRITON_CACHE_DIR": str(tmp_path / "fresh-cache"), "HOME": str(tmp_path),
           **{name: os.environ[name] for name in ("PYTHONPATH",) if name in os.environ}}  # this Triton, wherever it is

    def elsewhere(install):
        script = ELSEWHERE.format(benchmarks=str(ROOT / "benchmarks"), build=str(build), install=install)
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    assert elsewhere(install=False) == [False]  # nothing installed: the launch would compile
    (tmp_path / "fresh-cache").rename(tmp_path / "compiled-there")
    first, second = elsewhere(install=True)
    assert (first["installed"], first["cache_hits"], first["refused"]) == (1, 1, None)
    assert (second["installed"], second["present"]) == (0, 1)
    assert elsewhere(install=False) == [True]  # the launch finds the installed binary
    # check(): the same through Triton's whole launch path, in this process; n = 1 is another variant.
    report = kernel_cache.check(build, [("built", step), ("not built", lambda: step(1))])
    assert report["installed"]["installed"] == 1
    assert report["workloads"] == {"built": {"hits": 1, "misses": 0}, "not built": {"hits": 0, "misses": 1}}


def test_install_refuses_another_triton_version(kernel_cache, tmp_path):
    build = tmp_path / "build"
    build.mkdir()
    identity = kernel_cache._backend_identity()
    (build / kernel_cache.MANIFEST).write_text(json.dumps({**identity, "triton": "0.0.1", "entries": []}))
    with kernel_cache.offline_driver():
        counts = kernel_cache.install(build)
    assert counts["installed"] == 0 and "triton differs: built with 0.0.1" in counts["refused"]


def test_install_refuses_a_build_of_other_kernel_sources(kernel_cache, tmp_path):
    build = tmp_path / "build"
    build.mkdir()
    identity = kernel_cache._backend_identity()
    stale = {**identity, "kernels": {**identity["kernels"], "lstm_backward_kernel": "an older source"}, "entries": []}
    (build / kernel_cache.MANIFEST).write_text(json.dumps(stale))
    with kernel_cache.offline_driver():
        counts = kernel_cache.install(build)
    assert counts["installed"] == 0 and "source changed since the build" in counts["refused"]

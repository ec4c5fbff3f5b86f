"""Compiles the fused kernels' variants for sm_90 (H100/H200) without a GPU, and installs them into Triton's cache on the GPU machine.

Triton compiles each variant of a kernel (one specialisation of its arguments and launch
options) on one CPU core when it is first launched: about 3 s for the forward and 15-30 s for
the backward. A lent GPU session pays that out of its device minutes, for every variant its
tests and benchmarks launch. This tool moves the compiling to the development machine:

- ``capture`` runs the GPU session's workloads (the CUDA-marked tests, ``unroll_throughput.py``'s
  main run in both precisions and its sweep, ``optimizer_step.py``) on CPU tensors with Triton
  pointed at an sm_90 target. Each launch goes through Triton's own binder and is recorded as
  the specialisation data ``JITFunction.preload`` takes; nothing is compiled or run. Sizes
  above ``LARGEST_CAPTURED`` are replaced by a smaller one with the same remainder modulo 16,
  which is all Triton specialises integers and pointer offsets on.
- ``build`` compiles every recorded variant for sm_90 (Triton ships ptxas) into a directory of
  cubins, their metadata, and ``manifest.json``.
- ``install`` runs on the GPU machine before anything compiles. It preloads every variant
  through Triton's own ``preload``; when Triton's compile step asks for its cache directory by
  the key it computed on that machine, the carried cubin is put there first, so the step finds
  a cache hit. A copied cache directory would never be hit: the key hashes the local libtriton
  build, which differs between the Python 3.11 wheel here and the 3.12 wheel there. It
  installs nothing unless the kernels' source (Triton's hash of it), the Triton version, the
  compiler backend (ptxas version and architecture), the GPU's target and Triton's
  cache-invalidating environment variables equal the build's.

    python benchmarks/kernel_cache.py build [--out .triton-sm90] [--workers 2]   # development machine
    python benchmarks/kernel_cache.py install .triton-sm90                       # GPU machine (gpu_session.sh)
    python benchmarks/kernel_cache.py check .triton-sm90                         # replay the launches against it
    python benchmarks/kernel_cache.py resources .triton-sm90 [--json OUT]        # registers and spills of each
    python benchmarks/kernel_cache.py capture                                     # list the variants only
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import gzip
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from l2l import LearnedOptimizer
from l2l.kernels import dispatch, fused
from l2l.cli import output_file, path_arg, positive_int
from l2l.optimizers import CoordinateWiseLSTM

ROOT = Path(__file__).resolve().parents[1]
TARGET = ("cuda", 90, 32)  # backend, compute capability, warp size: the H100 and H200
SM_COUNT = 132  # sizes the backward's persistent grid (its program count is not specialised)
LARGEST_CAPTURED = 20_000  # coordinates; larger sizes are captured at a stand-in with the same remainder mod 16
DEFAULT_OUT = ROOT / ".triton-sm90"
MANIFEST = "manifest.json"
KERNELS = ("lstm_forward_kernel", "lstm_backward_kernel")
REGISTERS_PER_SM = 65536
L1_AND_SHARED_PER_SM = 256 * 1024  # H100/H200
FLAGS = ("HAS_PARAMS", "MASK_NONFINITE", "HAS_DU", "HAS_DH", "HAS_DC", "NEED_DG", "NEED_DSTATE", "NEED_DW")


class OfflineDriver:
    """Stands in for Triton's CUDA driver where there is no GPU: a target to compile for, device 0, stream 0."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        del device  # Unused.
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget(*TARGET)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


class _NoDeviceUtils:
    """What Triton asks of its driver's utilities to load a compiled kernel, answered without a GPU."""

    def get_device_properties(self, device: int) -> dict[str, int]:
        del device  # Unused.
        return {"max_shared_mem": 232_448, "multiprocessor_count": SM_COUNT}  # an H100/H200's

    def load_binary(self, name, kernel, shared, device) -> tuple[int, int, int, int, int]:
        del name, kernel, shared, device  # Unused.
        return 0, 0, 0, 0, 1024  # module, function, registers, spills, max threads


class NoLaunchDriver(OfflineDriver):
    """An :class:`OfflineDriver` that also loads compiled kernels and launches them, doing nothing (for :func:`check`)."""

    utils = _NoDeviceUtils()

    def launcher_cls(self, src, metadata) -> Callable[..., None]:
        del src, metadata  # Unused.
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def offline_driver(driver_type: type = OfflineDriver) -> Iterator[None]:
    """Inside the block Triton's JIT binds and compiles for sm_90 on a machine without a GPU."""
    from triton.runtime.driver import driver

    previous = driver._active  # None until first used; restored as found
    driver.set_active(driver_type())
    try:
        yield
    finally:
        driver._active = previous


@contextlib.contextmanager
def cuda_paths_on_cpu() -> Iterator[None]:
    """Inside the block l2l takes its CUDA code paths (the compiled fused kernels) for CPU tensors.

    Nothing a kernel would write is written, so ``torch.testing.assert_close`` is a no-op in the
    block (a test must go on to its later launches), and the CUDA memory and synchronisation
    calls the workloads make are stubbed.
    """

    def supported(device=None, rule=None, dtype=None):
        del device  # Unused.
        return fused.unsupported_reason(rule, dtype) if rule is not None else None

    select_kernel = dispatch.select_kernel

    def select_as_on_cuda(kernel, rule, device):
        del device  # Unused.
        return select_kernel(kernel, rule, torch.device("cuda"))

    with _patched([
        (fused, "_interpreted", lambda device: False),
        (fused, "_sm_count", lambda index: SM_COUNT),
        (fused, "unavailable_reason", supported),
        (dispatch, "select_kernel", select_as_on_cuda),
        (torch.testing, "assert_close", lambda *args, **kwargs: None),
        (torch.cuda, "current_device", lambda: 0),
        (torch.cuda, "synchronize", lambda *args, **kwargs: None),
        (torch.cuda, "empty_cache", lambda: None),
        (torch.cuda, "memory_allocated", lambda *args, **kwargs: 0),
        (torch.cuda, "max_memory_allocated", lambda *args, **kwargs: 0),
        (torch.cuda, "reset_peak_memory_stats", lambda *args, **kwargs: None),
    ]):
        yield


def stand_in_size(n: int) -> int:
    """``n``, or above :data:`LARGEST_CAPTURED` a smaller size Triton specialises identically (same remainder mod 16)."""
    return n if n <= LARGEST_CAPTURED else 16_000 + n % 16


@contextlib.contextmanager
def _patched(patches: list[tuple[Any, str, Any]]) -> Iterator[None]:
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in reversed(saved):
            setattr(owner, name, value)


class Capture:
    """Fused-kernel launches on CPU tensors recorded as sm_90 specialisation data instead of run (see :meth:`active`).

    Attributes:
        variants: specialisation data (a JSON string, as Triton serialises it) -> the
            workloads that launched it.
    """

    def __init__(self):
        self.variants: dict[str, set[str]] = {}
        self.workload = "?"

    def _hook(self, *, compile: dict[str, Any], **unused: Any) -> bool:
        del unused  # Unused.
        self.variants.setdefault(compile["specialization_data"], set()).add(self.workload)
        return True  # Triton then neither compiles nor launches

    @contextlib.contextmanager
    def active(self) -> Iterator["Capture"]:
        """Inside the block l2l's CUDA code paths run for CPU tensors (:func:`cuda_paths_on_cpu`) and every launch is only recorded."""
        from triton import knobs

        with offline_driver(), cuda_paths_on_cpu(), _patched([(knobs.runtime, "jit_cache_hook", self._hook)]):
            yield self

    def run(self, workload: str, fn: Callable[[], Any]) -> None:
        """Runs ``fn`` under the capture, its launches credited to ``workload``; its errors are reported, not raised."""
        self.workload = workload
        before = len(self.variants)
        with self.active():
            _run_workload(workload, fn)
        print(f"  {workload}: {len(self.variants) - before} new variants ({len(self.variants)} in all)", flush=True)


def _run_workload(name: str, fn: Callable[[], Any]) -> None:
    """Runs ``fn``; an error is printed, not raised (a workload that stops early has launched what it launched)."""
    try:
        fn()
    except Exception as error:
        message = str(error).splitlines()[0][:100] if str(error) else ""
        print(f"  {name}: stopped by {type(error).__name__}: {message}")


@contextlib.contextmanager
def _triton_cache(directory: str) -> Iterator[None]:
    """Triton's on-disk cache is ``directory`` inside the block (read from the environment at each compile)."""
    previous = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = directory
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TRITON_CACHE_DIR"]
        else:
            os.environ["TRITON_CACHE_DIR"] = previous


def _benchmark_module(name: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def session_workloads() -> list[tuple[str, Callable[[], Any]]]:
    """What ``gpu_session.sh`` launches, as (name, function) pairs runnable on the CPU under :class:`Capture`."""
    throughput = _benchmark_module("unroll_throughput")
    optimizer_step = _benchmark_module("optimizer_step")
    cpu = torch.device("cpu")

    def jobs(job_list):
        def run():
            seen = set()
            for measurement, changes, size in job_list:
                # GraphedTruncation refuses graphs off CUDA; the captured graph replays the eager launches.
                job = (measurement, changes, 0 if measurement == "quadratic" else stand_in_size(size))
                if repr(job) not in seen:
                    seen.add(repr(job))
                    throughput.run_job(job, cpu)
        return run

    def drop_in_steps():
        rule = CoordinateWiseLSTM(seed=0, kernel="fused")
        for size in (100_000, 1_000_000, 10_000_000):  # optimizer_step.py's sizes: four Linear layers each
            model = optimizer_step.make_model(size, cpu)
            LearnedOptimizer(model.parameters(), rule).step()

    workloads = []
    for precision in ("tf32x3", "tf32"):
        workloads.append((f"unroll_throughput {precision}", jobs(throughput.benchmark_jobs(precision))))
    workloads.append(("unroll_throughput --sweep", jobs(throughput.sweep_jobs("tf32x3"))))
    workloads.append(("optimizer_step", drop_in_steps))
    workloads.append(("CUDA tests", _cuda_tests))
    return workloads


def _cuda_tests() -> None:
    """The CUDA-marked tests, in this process, on CPU tensors (``tests/gpu.py``)."""
    import pytest

    os.environ["L2L_CUDA_TESTS_DEVICE"] = "cpu"
    try:
        pytest.main(["-q", "-m", "cuda", "-p", "no:cacheprovider", "--tb=no", "--no-header", "-rN",
                     "-W", "ignore", str(ROOT / "tests")])
        print("  (the CUDA tests' passes and failures above mean nothing: no kernel ran)")
    finally:
        del os.environ["L2L_CUDA_TESTS_DEVICE"]


def capture(workloads: list[tuple[str, Callable[[], Any]]] | None = None) -> dict[str, set[str]]:
    """Records the variants ``workloads`` (default :func:`session_workloads`) launch: specialisation data -> workloads."""
    recorder = Capture()
    for name, fn in workloads if workloads is not None else session_workloads():
        recorder.run(name, fn)
    return recorder.variants


def _portable(specialization: str) -> str:
    """Specialisation data without the machine's path to libdevice (the target machine's Triton fills in its own)."""
    data = json.loads(specialization)
    data["options"].pop("extern_libs", None)
    return json.dumps(data)  # in Triton's order: the signature's follows the kernel's arguments


def _kernel(name: str):
    return getattr(fused.kernels(), name)


def _compile(specialization: str) -> tuple[bytes, dict[str, Any], float]:
    """Compiles one variant for sm_90 (a worker of :func:`build`): cubin, metadata, seconds."""
    with tempfile.TemporaryDirectory() as cache, _triton_cache(cache), offline_driver():  # a fresh cache: this compiles
        name = json.loads(specialization)["name"].split(".")[-1]
        begin = time.perf_counter()
        compiled = _kernel(name).preload(specialization)
        seconds = time.perf_counter() - begin
        metadata_path = next(p for child, p in compiled.metadata_group.items() if child.endswith(".json"))
        metadata = json.loads(Path(metadata_path).read_text())
        for name in _environment():  # compile() records them; install() writes the target machine's
            metadata.pop(name, None)
        return compiled.asm["cubin"], metadata, seconds


def _environment() -> dict[str, str]:
    """The environment variables set here that change what Triton compiles (part of its cache key)."""
    from triton.compiler.compiler import get_cache_invalidating_env_vars

    return dict(get_cache_invalidating_env_vars())


def _backend_identity() -> dict[str, Any]:
    """What must be equal where a build is made and where it is installed."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return {"triton": triton.__version__, "backend": make_backend(GPUTarget(*TARGET)).hash(), "target": list(TARGET),
            "environment": _environment(),
            # Triton's hash of each kernel's source and what it calls: a build of other sources is stale.
            "kernels": {name: _kernel(name).cache_key for name in KERNELS}}


def build(out: Path, workers: int, variants: dict[str, set[str]] | None = None) -> dict[str, Any]:
    """Captures (unless given) and compiles every variant for sm_90 into ``out``: cubins, metadata, ``manifest.json``."""
    variants = capture() if variants is None else variants
    portable: dict[str, set[str]] = {}
    for specialization, workloads in variants.items():
        portable.setdefault(_portable(specialization), set()).update(workloads)
    order = sorted(portable, key=lambda s: (json.loads(s)["name"], s))
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("*.cubin.gz"):
        stale.unlink()
    begin = time.perf_counter()
    entries = []
    with contextlib.ExitStack() as stack:
        if workers > 1:
            context = multiprocessing.get_context("spawn")  # fresh workers: nothing of the capture's patching carries over
            compiled = stack.enter_context(concurrent.futures.ProcessPoolExecutor(workers, mp_context=context)).map(
                _compile, order)
        else:
            compiled = map(_compile, order)
        for index, (specialization, (cubin, metadata, seconds)) in enumerate(zip(order, compiled)):
            stem = f"{index:03d}-{metadata['name']}"
            # gzip: a quarter of the size (the carried files share 64 MiB with everything else carried)
            (out / f"{stem}.cubin.gz").write_bytes(gzip.compress(cubin, mtime=0))
            entries.append({"kernel": metadata["name"], "specialization": specialization, "cubin": f"{stem}.cubin.gz",
                            "metadata": metadata, "compile_s": round(seconds, 2),
                            "workloads": sorted(portable[specialization])})
            print(f"  {stem}: {seconds:5.1f} s, {len(cubin) / 1024:.0f} KiB", flush=True)
    manifest = {**_backend_identity(), "date": datetime.date.today().isoformat(), "entries": entries,
                "compile_s": round(sum(entry["compile_s"] for entry in entries), 1),
                "wall_s": round(time.perf_counter() - begin, 1)}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def install(directory: Path) -> dict[str, Any]:
    """Installs the carried variants into this machine's Triton cache (``TRITON_CACHE_DIR``): counts and the reason for any refusal.

    Must run where the kernels will launch (the same Triton, environment variables and GPU), before they first do.
    """
    from triton import knobs
    from triton.compiler import compiler as triton_compiler
    from triton.runtime.driver import driver

    manifest = json.loads((directory / MANIFEST).read_text())
    here = _backend_identity()
    target = driver.active.get_current_target()
    here["target"] = [target.backend, target.arch, target.warp_size]
    if manifest.get("kernels") != here["kernels"]:
        return {"installed": 0, "present": 0, "cache_hits": 0,
                "refused": "the kernels' source changed since the build (rebuild it)"}
    for field in ("triton", "backend", "target", "environment"):
        if manifest[field] != here[field]:
            return {"installed": 0, "present": 0, "cache_hits": 0,
                    "refused": f"{field} differs: built with {manifest[field]}, here {here[field]}"}
    counts = {"installed": 0, "present": 0, "refused": None}
    hits = []
    previous_listener = knobs.compilation.listener
    knobs.compilation.listener = lambda *, cache_hit, **unused: hits.append(cache_hit)
    real_cache_manager = triton_compiler.get_cache_manager
    begin = time.perf_counter()
    try:
        for entry in manifest["entries"]:
            def copy_into_cache(digest: str, entry: dict[str, Any] = entry):
                # compile() asks for its cache directory by the key it computed here; the
                # binaries are put there before it looks, so it finds them.
                manager = real_cache_manager(digest)
                name = entry["kernel"][:150]
                if manager.get_group(f"{name}.json") is None:
                    metadata = {**entry["metadata"], "hash": digest, **_environment()}
                    paths = {f"{name}.cubin": manager.put(gzip.decompress((directory / entry["cubin"]).read_bytes()),
                                                                 f"{name}.cubin"),
                             f"{name}.json": manager.put(json.dumps(metadata), f"{name}.json", binary=False)}
                    manager.put_group(f"{name}.json", paths)
                    counts["installed"] += 1
                else:
                    counts["present"] += 1
                return manager

            with _patched([(triton_compiler, "get_cache_manager", copy_into_cache)]):
                _kernel(entry["kernel"]).preload(entry["specialization"])
    finally:
        knobs.compilation.listener = previous_listener
    counts["cache_hits"] = sum(hits)
    counts["seconds"] = round(time.perf_counter() - begin, 2)
    counts["compile_s_saved"] = manifest.get("compile_s")
    return counts


def check(directory: Path, workloads: list[tuple[str, Callable[[], Any]]] | None = None) -> dict[str, Any]:
    """Installs a build into a fresh cache here, then replays the workloads through Triton's real launch path.

    The launches go through Triton's binder and cache lookup as on the GPU machine; the kernels
    are then loaded and launched by :class:`NoLaunchDriver`, which does nothing. A miss is a
    variant the build lacks (Triton compiles it, for sm_90, here).

    Returns:
        ``{"installed": install()'s counts, "workloads": {name: {"hits": int, "misses": int}}}``.
    """
    from triton import knobs

    outcomes: dict[str, list[bool]] = {}
    current = ["?"]

    def listener(*, cache_hit: bool, **unused: Any) -> None:
        del unused  # Unused.
        outcomes.setdefault(current[0], []).append(cache_hit)

    with tempfile.TemporaryDirectory() as cache, _triton_cache(cache):
        with offline_driver():
            installed = install(directory)
        for name in KERNELS:  # forget what install() loaded: every launch goes to the cache on disk
            _kernel(name).device_caches.clear()
        with offline_driver(NoLaunchDriver), cuda_paths_on_cpu(), _patched([(knobs.compilation, "listener", listener)]):
            for name, fn in workloads if workloads is not None else session_workloads():
                current[0] = name
                _run_workload(name, fn)
        for name in KERNELS:  # loaded through the do-nothing driver: unusable elsewhere
            _kernel(name).device_caches.clear()
    return {"installed": installed, "workloads": {name: {"hits": sum(hits), "misses": len(hits) - sum(hits)}
                                                  for name, hits in outcomes.items()}}


def _constants(entry: dict[str, Any]) -> dict[str, Any]:
    """A built variant's constexpr arguments (and integers specialised to 1) by argument name."""
    names = _kernel(entry["kernel"]).arg_names
    data = json.loads(entry["specialization"])
    return {names[path[0]]: value for path, value in zip(data["constant_keys"], data["constant_vals"])}


def resources(directory: Path) -> list[dict[str, Any]]:
    """Registers, spills and shared memory of every variant in a build: the ones the GPU session launches.

    Read with the cuobjdump Triton ships. Spilled registers live in local memory, cached in L1;
    where the resident programs' stack plus their shared memory exceeds an SM's 256 KiB of L1
    (``stack_fits_l1`` False), spills travel to L2, which is what makes them expensive.
    """
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    rows = []
    for entry in json.loads((directory / MANIFEST).read_text())["entries"]:
        constants = _constants(entry)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
            handle.write(gzip.decompress((directory / entry["cubin"]).read_bytes()))
            handle.flush()
            out = subprocess.run([str(cuobjdump), "--dump-resource-usage", handle.name], capture_output=True,
                                 text=True, check=True).stdout
        registers, stack = (int(re.search(rf"{key}:(\d+)", out).group(1)) for key in ("REG", "STACK"))
        warps, shared = entry["metadata"]["num_warps"], entry["metadata"]["shared"]
        threads = 32 * warps
        # Resident programs per SM as the register file allows (allocated in units of 8 per thread).
        resident = REGISTERS_PER_SM // (threads * -(-registers // 8) * 8)
        scratch = constants.get("DW_SCRATCH")
        rows.append({
            "kernel": entry["kernel"].removeprefix("lstm_").removesuffix("_kernel"),
            "precision": constants["PRECISION"], "block": constants["BLOCK"], "warps": warps,
            "maxnreg": entry["metadata"]["maxnreg"], "weight_grads": None if scratch is None else
            ("scratch" if scratch else "registers"),
            "flags": [flag for flag in FLAGS if constants.get(flag) is True], "n_is_1": constants.get("N") == 1,
            "registers": registers, "stack_bytes": stack, "shared_bytes": shared,
            "programs_per_sm_by_registers": resident, "stack_bytes_per_coordinate": stack * threads / constants["BLOCK"],
            "stack_fits_l1": resident * (threads * stack + shared) <= L1_AND_SHARED_PER_SM,
            "workloads": entry["workloads"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("capture", help="list the variants the GPU session launches")
    build_parser = commands.add_parser("build", help="capture and compile them for sm_90")
    build_parser.add_argument("--out", type=path_arg, default=DEFAULT_OUT)
    build_parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1)
    install_parser = commands.add_parser("install", help="install a build into this machine's Triton cache")
    install_parser.add_argument("directory", type=path_arg, nargs="?", default=DEFAULT_OUT)
    check_parser = commands.add_parser("check", help="install a build into a fresh cache here and replay the "
                                                     "session's launches against it (no GPU needed)")
    check_parser.add_argument("directory", type=path_arg, nargs="?", default=DEFAULT_OUT)
    resources_parser = commands.add_parser("resources", help="registers and spills of every variant in a build")
    resources_parser.add_argument("directory", type=path_arg, nargs="?", default=DEFAULT_OUT)
    resources_parser.add_argument("--json", type=output_file, help="write the rows here")
    args = parser.parse_args()
    if args.command == "capture":
        for specialization, workloads in sorted(capture().items()):
            data = json.loads(specialization)
            constants = dict(zip((k[0] for k in data["constant_keys"]), data["constant_vals"]))
            print(data["name"].split(".")[-1], data["options"]["num_warps"], constants, sorted(workloads))
    elif args.command == "check":
        report = check(args.directory)
        print(f"installed {report['installed']['installed']} variants "
              f"({report['installed']['refused'] or 'not refused'}); launches replayed:")
        for name, counts in report["workloads"].items():
            print(f"  {name:28} {counts['hits']:4} cache hits, {counts['misses']:3} compiled")
    elif args.command == "resources":
        rows = resources(args.directory)
        print(f"{'kernel':8} {'precision':9} {'block':>5} {'warps':>5} {'maxnreg':>7} {'weight_grads':12} {'REG':>4} "
              f"{'STACK B':>8} {'B/coord':>8} {'progs/SM':>8} {'fits L1':>7}  flags")
        for row in sorted(rows, key=lambda r: (r["kernel"], r["precision"], r["block"], r["warps"], str(r["maxnreg"]),
                                               str(r["weight_grads"]), r["flags"])):
            print(f"{row['kernel']:8} {row['precision']:9} {row['block']:5} {row['warps']:5} {str(row['maxnreg']):>7} "
                  f"{row['weight_grads'] or '-':12} {row['registers']:4} {row['stack_bytes']:8} "
                  f"{row['stack_bytes_per_coordinate']:8.0f} {row['programs_per_sm_by_registers']:8} "
                  f"{'yes' if row['stack_fits_l1'] else 'no':>7}  {' '.join(row['flags'])}"
                  f"{' N=1' if row['n_is_1'] else ''}")
        if args.json:
            manifest = json.loads((args.directory / MANIFEST).read_text())
            args.json.write_text(json.dumps({"date": datetime.date.today().isoformat(), "triton": manifest["triton"],
                                             "target": "sm_90", "rows": rows}, indent=1))
    elif args.command == "build":
        manifest = build(args.out, args.workers)
        print(f"built {len(manifest['entries'])} variants for sm_90 with Triton {manifest['triton']} into {args.out}: "
              f"{manifest['compile_s']:.0f} s of compiling, {manifest['wall_s']:.0f} s on {args.workers} workers")
    else:
        if not torch.cuda.is_available():
            print("kernel cache: no GPU here, nothing to install")
            return
        if not (args.directory / MANIFEST).exists():
            print(f"no kernel build in {args.directory}: run `python benchmarks/kernel_cache.py build` where Triton "
                  "is installed and carry the directory; the kernels compile on first launch instead")
            return
        counts = install(args.directory)
        if counts["refused"]:
            print(f"kernel cache not installed: {counts['refused']}; the kernels compile on first launch instead")
        else:
            print(f"kernel cache: {counts['installed']} variants installed, {counts['present']} already present, "
                  f"{counts['cache_hits']} cache hits checked, in {counts['seconds']} s "
                  f"(their compiling took {counts['compile_s_saved']} s on the build machine)")


if __name__ == "__main__":
    main()

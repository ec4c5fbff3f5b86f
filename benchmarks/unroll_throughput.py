"""Coordinate-steps per second of the reference and fused LSTM paths, against the measured byte roofline.

Measures, in one run: the ceilings (device copy bandwidth, read + write bytes; fp32 and tf32
matmul), then for each size the inference step (no grad, parameters updated) and meta-training
forward + backward (a T-step unroll on a diagonal quadratic, first order), each as
coordinate-steps per second and as a fraction of its byte roofline; the paper's quadratic
meta-iteration (128 x 10 coordinates, 20-step unroll, forward + backward + Adam step: eager,
and replayed from CUDA graphs); and the drop-in ``LearnedOptimizer.step()`` against
``torch.optim.Adam`` (fused on CUDA, foreach on the CPU); then it judges the issue's targets
(:func:`targets`: printed, and under ``"targets"`` in the JSON). Timings are medians (CUDA
events on the GPU). On the CPU only the reference path runs (small sizes, about a minute). On
CUDA the fused kernels' variants are first compiled in ``--workers`` processes.

Byte rooflines (float32 state, 2 x 20 LSTM), per coordinate-step: inference 652 bytes (read g,
h, c, the parameter; write h, c, the parameter); meta-training 1,616 bytes (forward: read g,
h, c, write h, c and the update = 648; backward: read g, h, c, d h_new, d c_new, d update,
write d h, d c = 968). Roofline = copy bandwidth / bytes. The timed inference kernel also
stores the update (656 bytes), so its fraction of the 652-byte roofline is conservative by 0.6%.

A figure that fails (out of memory, a compile error) is recorded as that row's ``error`` and the
run goes on; with ``--json`` the report (or the sweep's rows) is rewritten after every row, so a run cut short by a
time limit keeps what it measured.

    python benchmarks/unroll_throughput.py --device cpu|cuda [--json OUT] [--precision tf32x3|tf32|ieee]
    python benchmarks/unroll_throughput.py --device cuda --sweep     # launch settings of the fused kernels
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import multiprocessing
import os
import platform
import statistics
import time
from typing import Any, Callable

import torch
from torch import Tensor

from l2l import LearnedOptimizer
from l2l.checkpoint import atomic_write
from l2l.kernels import fused
from l2l.meta.graphs import GraphedTruncation
from l2l.meta.unroll import start, unroll
from l2l.optimizers import CoordinateWiseLSTM, LSTMState
from l2l.tasks import QuadraticFamily
from l2l.tasks.base import Task
from l2l.cli import output_file, positive_int, positive_int_list

INFERENCE_BYTES = 4 + 2 * 160 + 2 * 160 + 8  # g; h, c read and written (2 x 20 float32 each); parameter r/w
META_BYTES = (4 + 320 + 320 + 4) + (4 + 320 + 320 + 4 + 320)  # forward + backward (see the docstring)


class DiagonalQuadratic(Task):
    """``f_k(theta) = sum_i a_i (theta_i - t_i)^2`` over K instances: an elementwise optimizee, so the unroll's cost is the optimizer's."""

    def __init__(self, num_instances: int, num_params: int, device: torch.device):
        generator = torch.Generator().manual_seed(0)
        self.a = (torch.rand(num_instances, num_params, generator=generator) + 0.5).to(device)
        self.t = torch.randn(num_instances, num_params, generator=generator).to(device)

    @property
    def num_instances(self) -> int:
        return self.a.shape[0]

    @property
    def num_params(self) -> int:
        return self.a.shape[1]

    def init_params(self) -> Tensor:
        return torch.zeros_like(self.t)

    def loss(self, params: Tensor, batch: Any = None) -> Tensor:
        return (self.a * (params - self.t).square()).sum(1)


def timer(device: torch.device) -> Callable[[Callable[[], Any], int, int], float]:
    """``median_seconds(fn, warmup, repeats)``: CUDA events on the GPU, perf_counter on the CPU."""

    def median_seconds(fn: Callable[[], Any], warmup: int = 2, repeats: int = 10) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                fn()
                end.record()
                end.synchronize()
                times.append(begin.elapsed_time(end) / 1e3)
            else:
                begin_s = time.perf_counter()
                fn()
                times.append(time.perf_counter() - begin_s)
        return statistics.median(times)

    return median_seconds


def ceilings(device: torch.device, seconds) -> dict[str, float]:
    """Copy bandwidth (bytes read + written per second) and fp32/tf32 matmul FLOP/s, measured now."""
    numel = 2**28 if device.type == "cuda" else 2**24
    src = torch.empty(numel, device=device).uniform_()
    dst = torch.empty_like(src)
    copy_s = seconds(lambda: dst.copy_(src), 3, 20)
    result = {"copy_bandwidth_Bps": 2 * 4 * numel / copy_s}
    size = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    previous = torch.backends.cuda.matmul.allow_tf32
    for name, tf32 in (("fp32", False), ("tf32", True)):
        if device.type != "cuda" and tf32:
            continue
        torch.backends.cuda.matmul.allow_tf32 = tf32
        result[f"matmul_{name}_flops"] = 2 * size**3 / seconds(lambda: a @ b, 2, 10)
    torch.backends.cuda.matmul.allow_tf32 = previous
    del src, dst, a, b
    return result


def inference(rule: CoordinateWiseLSTM, kernel: str, n: int, device: torch.device, seconds) -> float:
    """Seconds per inference step (update applied to the parameters) of ``n`` coordinates."""
    grad = torch.randn(n, device=device) * 1e-2
    params = torch.zeros(n, device=device)
    h, c = rule.init_state(n, device=device)
    if kernel == "fused":
        step = lambda: fused.lstm_step_(rule, grad, h, c, params=params)  # noqa: E731
    else:
        state = [LSTMState(h, c)]

        def step():
            with torch.no_grad():
                update, state[0] = rule(grad, state[0])
                params.add_(update)

    return seconds(step, 2, 10 if n <= 1e6 else 5)


def meta_training(rule: CoordinateWiseLSTM, n: int, steps: int, device: torch.device, seconds,
                  kept: bool = True) -> tuple[float, float | None]:
    """Seconds per unroll of ``steps`` steps + backward on ``n`` coordinates, and bytes kept per coordinate-step (CUDA, ``kept``)."""
    instances = max(1, n // 1000)
    task = DiagonalQuadratic(instances, n // instances, device)
    carry = start(rule, task)

    def run():
        losses, _ = unroll(rule, task, carry, steps)
        losses.sum().backward()
        rule.zero_grad(set_to_none=True)

    elapsed = seconds(run, 1, 3 if n >= 1e6 else 5)
    if device.type != "cuda" or not kept:
        return elapsed, None
    # The memory kept is read in one more, untimed, unroll: reading it in the timed ones put a
    # host synchronisation and the allocator's statistics inside every timing.
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    losses, _ = unroll(rule, task, carry, steps)
    per_coordinate_step = (torch.cuda.max_memory_allocated(device) - base) / (task.num_instances * task.num_params * steps)
    del losses
    return elapsed, per_coordinate_step


def quadratic_iteration(kernel: str, graphs: bool, device: torch.device, seconds) -> float:
    """Seconds per meta-iteration of the paper's setting: 128 x 10, 20-step unroll, forward + backward + Adam step."""
    task = QuadraticFamily().sample(128, torch.Generator().manual_seed(0), device)
    rule = CoordinateWiseLSTM(seed=0, kernel=kernel).to(device)
    optimizer = torch.optim.Adam(rule.parameters(), lr=1e-3, capturable=device.type == "cuda")
    runner = GraphedTruncation(rule, optimizer, task, torch.ones(20, device=device), 1.0, use_graph=graphs)
    carry = [start(rule, task)]

    def iteration():
        carry[0] = runner(carry[0], 20).carry

    return seconds(iteration, 3, 20)


def drop_in(n: int, device: torch.device, seconds, kernel: str) -> dict[str, float]:
    """Seconds per ``optimizer.step()`` of the learned optimizer and of Adam on ``n`` parameters (one flat tensor)."""
    param = torch.nn.Parameter(torch.zeros(n, device=device))
    param.grad = torch.randn(n, device=device) * 1e-2
    adam = torch.optim.Adam([param], lr=1e-3, **({"fused": True} if device.type == "cuda" else {"foreach": True}))
    result = {"adam_s": seconds(adam.step, 2, 10)}
    learned = LearnedOptimizer([param], CoordinateWiseLSTM(seed=0, kernel=kernel).to(device))
    result["learned_s"] = seconds(learned.step, 2, 10 if n <= 1e6 else 5)
    return result


def targets(report: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets for the CUDA path, each with its measured figure and whether it is met.

    Inference at 1e7 coordinates >= 60% of the byte roofline; at every size >= 1e6, meta-training
    >= 35% of its roofline, >= 4x the reference path's coordinate-steps/s, and <= 400 bytes kept
    per coordinate-step; the paper's quadratic meta-iteration >= 10x faster with the fused kernel
    and CUDA graphs than with the reference path. ``met`` is None where the run did not measure
    the figure (a size left out, a CPU run).
    """
    rows = {(row["coordinates"], row["kernel"]): row for row in report.get("sizes", [])}
    checks: list[dict[str, Any]] = []

    def check(name: str, value: float | None, threshold: float, at_least: bool = True) -> None:
        met = None if value is None else bool(value >= threshold if at_least else value <= threshold)
        checks.append({"target": name, "value": value, "threshold": threshold,
                       "comparison": ">=" if at_least else "<=", "met": met})

    check("inference roofline fraction at 1e7", rows.get((10_000_000, "fused"), {}).get("inference_roofline_fraction"),
          0.60)
    for n in sorted({n for n, _ in rows if n >= 1_000_000}) or [1_000_000]:
        fused_row, reference_row = rows.get((n, "fused"), {}), rows.get((n, "reference"), {})
        size = f"{n:.0e}".replace("e+0", "e").replace("e+", "e")  # 1e6
        check(f"meta-training roofline fraction at {size}", fused_row.get("meta_roofline_fraction"), 0.35)
        speedup = (fused_row["meta_cs_per_s"] / reference_row["meta_cs_per_s"]
                   if "meta_cs_per_s" in fused_row and "meta_cs_per_s" in reference_row else None)
        check(f"meta-training fused / reference at {size}", speedup, 4.0)
        check(f"meta-training bytes kept per coordinate-step at {size}",
              fused_row.get("meta_bytes_per_coordinate_step"), 400, at_least=False)
    quadratic = report.get("quadratic_iteration_s", {})
    check("quadratic meta-iteration reference / fused+graphs",
          quadratic["reference"] / quadratic["fused+graphs"] if {"reference", "fused+graphs"} <= quadratic.keys()
          else None, 10.0)
    return checks


def _run_once(fn: Callable[[], Any], warmup: int = 0, repeats: int = 1) -> float:
    """A ``seconds`` for :func:`precompile`: runs ``fn`` once, so its kernels compile, and times nothing."""
    del warmup, repeats  # Unused.
    fn()
    return 1.0


# A precompile job: (measurement, FusedConfig changes, size); the size of "quadratic" is 1 with graphs.
WarmJob = tuple[str, dict[str, Any], int]


def run_job(job: WarmJob, device: torch.device) -> None:
    """Runs one measurement of a precompile job once with the fused kernel (its kernels compile; nothing is timed)."""
    measurement, changes, size = job
    with fused.configured(**changes):
        rule = CoordinateWiseLSTM(seed=0, kernel="fused").to(device)
        if measurement == "inference":
            inference(rule, "fused", size, device, _run_once)
        elif measurement == "meta":
            # Three steps launch every variant a longer unroll does (first, middle and last step).
            meta_training(rule, size, 3, device, _run_once, kept=False)
        elif measurement == "quadratic":
            quadratic_iteration("fused", bool(size), device, _run_once)
        elif measurement == "drop_in":
            drop_in(size, device, _run_once, "fused")
        else:
            raise ValueError(f"unknown measurement {measurement!r}")


def _warm(job: WarmJob) -> tuple[float, str | None]:
    """Runs one job on CUDA (a worker of :func:`precompile`): seconds taken, error."""
    begin = time.perf_counter()
    try:
        run_job(job, torch.device("cuda"))
        torch.cuda.synchronize()
        error = None
    except Exception as caught:  # the timed run reports it again, with its row
        error = str(caught).splitlines()[0][:120] if str(caught) else type(caught).__name__
    torch.cuda.empty_cache()
    return time.perf_counter() - begin, error


def precompile(jobs: list[WarmJob], workers: int) -> None:
    """Compiles the kernels the jobs launch in ``workers`` processes at once, filling Triton's on-disk cache.

    Triton compiles each kernel variant on one CPU core when it is first launched (17 to 31 s
    for the backward kernel, 5 s for the forward, on the development machine); the sweep meets
    18 variants. Running each measurement once in parallel processes first leaves the timed run,
    in this process, only cache hits. Compilation never enters a timing either way (every
    measurement warms up first): this saves wall-clock time on a machine lent by the minute.
    """
    begin = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        results = list(pool.map(_warm, jobs))
    for job, (_, error) in zip(jobs, results):
        if error:
            print(f"  precompile {job}: {error}", flush=True)
    print(f"precompiled {len(jobs)} measurements in {workers} processes: {time.perf_counter() - begin:.0f} s "
          f"(one after another: {sum(seconds for seconds, _ in results):.0f} s)", flush=True)


# Launch settings the sweep covers: (block, warps) per kernel.
FORWARD_SETTINGS = ((32, 4), (64, 4), (64, 8), (128, 4), (128, 8))
BACKWARD_SETTINGS = ((16, 4), (16, 8), (32, 4), (32, 8))
SWEEP_SIZES = (10_000_000, 1_000_000)  # the forward is swept by inference at the first, the backward by meta-training
CUDA_SIZES = (1280, 16_000, 1_000_000, 10_000_000)
CUDA_DROP_IN_SIZES = (1_000_000, 10_000_000)


def sweep_settings() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The sweep's FusedConfig changes: forward settings x maxnreg, and backward settings x weight-gradient modes."""
    forward_changes = [dict(block=block, warps=warps, maxnreg=maxnreg)
                       for block, warps in FORWARD_SETTINGS for maxnreg in (None, 128)]
    backward_changes = [dict(weight_grads=weight_grads, backward_block=block, backward_warps=warps)
                        for weight_grads in fused.WEIGHT_GRADS for block, warps in BACKWARD_SETTINGS]
    return forward_changes, backward_changes


def sweep_jobs(precision: str, sizes: tuple[int, int] = SWEEP_SIZES) -> list[WarmJob]:
    """The precompile jobs of :func:`sweep`: one per launch setting."""
    forward_changes, backward_changes = sweep_settings()
    return ([("inference", {"precision": precision, **changes}, sizes[0]) for changes in forward_changes]
            + [("meta", {"precision": precision, **changes}, sizes[1]) for changes in backward_changes])


def benchmark_jobs(precision: str, sizes: tuple[int, ...] = CUDA_SIZES,
                   drop_in_sizes: tuple[int, ...] = CUDA_DROP_IN_SIZES) -> list[WarmJob]:
    """The precompile jobs of the main run: every size's inference and meta-training, the quadratic, the drop-in."""
    changes = {"precision": precision}
    return ([(measurement, changes, n) for n in sizes for measurement in ("inference", "meta")]
            + [("quadratic", changes, graphs) for graphs in (0, 1)]
            + [("drop_in", changes, n) for n in drop_in_sizes])


def sweep(device: torch.device, seconds, precision: str, workers: int = 1,
          sizes: tuple[int, int] = SWEEP_SIZES,
          on_row: Callable[[list[dict[str, Any]]], None] = lambda rows: None) -> list[dict[str, Any]]:
    """Times the fused kernels' launch settings: the forward by inference at sizes[0], the backward by meta-training at sizes[1].

    The two kernels are swept separately (their settings are independent): the forward over
    ``FORWARD_SETTINGS`` x ``maxnreg`` in (None, 128), the backward over ``BACKWARD_SETTINGS`` x
    ``fused.WEIGHT_GRADS`` with the forward at its default. With ``workers > 1`` every setting
    is compiled first in that many processes (:func:`precompile`). ``on_row(rows)`` is called
    after every setting with the rows so far (``main`` saves them: a sweep cut short by a time
    limit keeps what it measured).
    """
    rule = CoordinateWiseLSTM(seed=0, kernel="fused").to(device)
    rows = []
    forward_changes, backward_changes = sweep_settings()
    if workers > 1:
        precompile(sweep_jobs(precision, sizes), workers)

    def measure(row: dict[str, Any], changes: dict[str, Any], run: Callable[[], dict[str, float]]) -> None:
        try:
            with fused.configured(precision=precision, **changes):
                row.update(run())
        except Exception as error:  # a setting that does not compile or fit: report it and go on
            row["error"] = str(error).splitlines()[0][:120]
        rows.append(row)
        print(row, flush=True)
        on_row(rows)

    for changes in forward_changes:
        measure({"kernel": "forward", "precision": precision, **changes}, changes,
                lambda: {"inference_cs_per_s": sizes[0] / inference(rule, "fused", sizes[0], device, seconds)})
    for changes in backward_changes:
        row = {"kernel": "backward", "precision": precision, "weight_grads": changes["weight_grads"],
               "block": changes["backward_block"], "warps": changes["backward_warps"]}
        measure(row, changes,
                lambda: {"meta_cs_per_s": sizes[1] * 5 / meta_training(rule, sizes[1], 5, device, seconds, kept=False)[0]})
    return rows


def save_json(path: str | None, data: Any) -> None:
    """Writes ``data`` as JSON to ``path`` atomically (nothing where ``path`` is None): a kill mid-write keeps the last copy."""
    if path:
        text = json.dumps(data, indent=1)
        atomic_write(path, lambda handle: handle.write(text.encode()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--sizes", type=positive_int_list, help="coordinates, comma-separated (default: cpu 1280,16000; cuda 1280,16000,1e6,1e7)")
    parser.add_argument("--unroll", type=positive_int, default=20, help="steps of the meta-training unroll")
    parser.add_argument("--precision", default=fused.get_config().precision, choices=fused.PRECISIONS)
    parser.add_argument("--threads", type=positive_int, default=1, help="CPU threads")
    parser.add_argument("--json", type=output_file, help="write every figure here (rewritten after every row)")
    parser.add_argument("--kernels", default="reference,fused",
                        help="paths to time, comma-separated (the fused one only on CUDA with Triton)")
    parser.add_argument("--sweep", action="store_true", help="time the fused kernels' launch settings instead")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="on CUDA the fused kernels are first compiled in this many processes "
                             "(1: compile on first launch instead)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    seconds = timer(device)
    fused.set_config(precision=args.precision)
    if args.sweep:
        sweep(device, seconds, args.precision, args.workers, on_row=lambda rows: save_json(args.json, rows))
        return
    sizes = list(args.sizes) if args.sizes else (
        [1280, 16_000] if device.type == "cpu" else list(CUDA_SIZES))
    asked = [name.strip() for name in args.kernels.split(",") if name.strip()]
    unknown = sorted(set(asked) - {"reference", "fused"})
    if unknown or not asked:
        parser.error(f"--kernels takes reference and/or fused, got {args.kernels!r}")
    fused_ready = device.type == "cuda" and fused.fused_available(device)
    kernels = [name for name in ("reference", "fused") if name in asked and (name == "reference" or fused_ready)]
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or platform.machine()}, {args.threads} threads"
    report: dict[str, Any] = {
        "date": datetime.date.today().isoformat(), "device": args.device, "machine": machine,
        "torch": torch.__version__, "triton": fused.triton_version(), "precision": args.precision,
        "fused_config": dataclasses.asdict(fused.get_config()),
        "bytes_per_coordinate_step": {"inference": INFERENCE_BYTES, "meta_training": META_BYTES},
    }
    drop_in_sizes = CUDA_DROP_IN_SIZES if device.type == "cuda" else (100_000,)

    def save() -> None:
        report["targets"] = targets(report)
        save_json(args.json, report)

    if "fused" in kernels and args.workers > 1:
        precompile(benchmark_jobs(args.precision, tuple(sizes), drop_in_sizes), args.workers)
    report["ceilings"] = ceilings(device, seconds)
    save()
    bandwidth = report["ceilings"]["copy_bandwidth_Bps"]
    print(f"unroll_throughput on {args.device} ({machine}), torch {torch.__version__}, triton {report['triton']}, "
          f"fused precision {args.precision}")
    print("ceilings: copy {:.3g} TB/s (read+write)".format(bandwidth / 1e12) + "".join(
        f", matmul {k.split('_')[1]} {v / 1e12:.3g} TFLOP/s" for k, v in report["ceilings"].items() if k.startswith("matmul")))
    print(f"byte rooflines: inference {bandwidth / INFERENCE_BYTES:.3g} coordinate-steps/s ({INFERENCE_BYTES} B), "
          f"meta-training {bandwidth / META_BYTES:.3g} ({META_BYTES} B)")

    rows = report["sizes"] = []
    rule = CoordinateWiseLSTM(seed=0).to(device)
    for n in sizes:
        for kernel in kernels:
            rule.kernel = kernel
            row: dict[str, Any] = {"coordinates": n, "kernel": kernel}
            rows.append(row)
            try:
                row["inference_s"] = inference(rule, kernel, n, device, seconds)
                row["inference_cs_per_s"] = n / row["inference_s"]
                row["inference_roofline_fraction"] = row["inference_cs_per_s"] * INFERENCE_BYTES / bandwidth
                steps = args.unroll
                bytes_needed = n * steps * (2300 if kernel == "reference" else 420)
                free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else float("inf")
                if device.type == "cuda" and bytes_needed > 0.85 * free:
                    steps = int(0.85 * free / (n * (2300 if kernel == "reference" else 420)))
                if steps >= 2:
                    row["meta_steps"] = steps
                    row["meta_s"], row["meta_bytes_per_coordinate_step"] = meta_training(rule, n, steps, device, seconds)
                    row["meta_cs_per_s"] = n * steps / row["meta_s"]
                    row["meta_roofline_fraction"] = row["meta_cs_per_s"] * META_BYTES / bandwidth
            except Exception as error:  # out of memory, a compile error: record it and measure the rest
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
            print(f"  N {n:>10,} {kernel:9}  " + _size_line(row), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            save()

    quadratic = report["quadratic_iteration_s"] = {}
    errors = report["errors"] = {}
    for kernel in kernels:
        for graphs in ((False, True) if device.type == "cuda" else (False,)):
            name = f"{kernel}{'+graphs' if graphs else ''}"
            try:
                quadratic[name] = quadratic_iteration(kernel, graphs, device, seconds)
            except Exception as error:
                errors[f"quadratic {name}"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
                print(f"  quadratic 128 x 10: {name}: {errors[f'quadratic {name}']}", flush=True)
                continue
            versus = f" ({quadratic['reference'] / quadratic[name]:.1f}x reference)" if "reference" in quadratic else ""
            print(f"  quadratic 128 x 10, T=20, fwd+bwd+Adam: {name:18} {quadratic[name] * 1e3:8.2f} ms{versus}", flush=True)
            save()

    drop = report["drop_in"] = []
    for n in drop_in_sizes:
        for kernel in kernels:
            try:
                row = {"params": n, "kernel": kernel, **drop_in(n, device, seconds, kernel)}
            except Exception as error:
                errors[f"drop-in {n} {kernel}"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
                print(f"  drop-in step, {n:>10,} params, {kernel:9}: {errors[f'drop-in {n} {kernel}']}", flush=True)
                continue
            row["ratio"] = row["learned_s"] / row["adam_s"]
            drop.append(row)
            print(f"  drop-in step, {n:>10,} params, {kernel:9}: learned {row['learned_s'] * 1e3:8.3f} ms, "
                  f"Adam({'fused' if device.type == 'cuda' else 'foreach'}) {row['adam_s'] * 1e3:7.3f} ms, "
                  f"{row['ratio']:.1f}x", flush=True)
            save()
    report["targets"] = targets(report)
    if any(check["met"] is not None for check in report["targets"]):
        print("issue targets:")
        for check in report["targets"]:
            verdict = {True: "met", False: "MISSED", None: "not measured"}[check["met"]]
            value = "-" if check["value"] is None else f"{check['value']:.3g}"
            print(f"  {check['target']:55} {value:>8} (needs {check['comparison']} {check['threshold']:g}): {verdict}")
        print(f"all targets met: {'yes' if all(check['met'] for check in report['targets']) else 'no'}", flush=True)
    if args.json:
        save()
        print(f"written to {args.json}")


def _size_line(row: dict[str, Any]) -> str:
    """One size's figures as printed: inference, meta-training, or the error that stopped them."""
    if "inference_cs_per_s" not in row:
        return f"error: {row.get('error')}"
    line = f"inference {row['inference_cs_per_s']:9.3g} cs/s ({row['inference_roofline_fraction']:6.1%} of roofline)   "
    if "meta_s" in row:
        line += (f"meta fwd+bwd {row['meta_cs_per_s']:9.3g} cs/s ({row['meta_roofline_fraction']:6.1%}), "
                 f"T={row['meta_steps']}" + (f", {row['meta_bytes_per_coordinate_step']:.0f} B/cs kept"
                                            if row.get("meta_bytes_per_coordinate_step") else ""))
    else:
        line += f"meta: {'error: ' + row['error'] if 'error' in row else 'skipped (memory)'}"
    return line


if __name__ == "__main__":
    main()

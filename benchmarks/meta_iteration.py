"""Times one meta-training iteration (20-step unroll forward + backward + meta step), batched vs per-parameter loop.

The batched path is l2l's: all K*n coordinates go through the LSTM in one call per step. The
loop path is the straightforward port: every optimizee instance is its own parameter tensor,
and each step loops over them, calling the LSTM once per tensor with that tensor's hidden
state (as one would write ``for p in model.parameters(): ...``). Both compute the same
meta-gradient (checked before timing).

    python benchmarks/meta_iteration.py [--device cpu|cuda] [--instances 128] [--dim 10] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from l2l.meta.unroll import start, unroll
from l2l.optimizers import CoordinateWiseLSTM
from l2l.tasks import QuadraticFamily
from l2l.cli import device_arg, output_file, positive_int


def batched_iteration(lstm, meta_optimizer, task, steps):
    carry = start(lstm, task)
    losses, _ = unroll(lstm, task, carry, steps)
    meta_loss = losses.sum(0).mean()
    meta_optimizer.zero_grad(set_to_none=True)
    meta_loss.backward()
    torch.nn.utils.clip_grad_norm_(lstm.parameters(), 1.0)
    meta_optimizer.step()
    return meta_loss


def loop_iteration(lstm, meta_optimizer, task, steps):
    K = task.num_instances
    params = [task.init_params()[k] for k in range(K)]
    states = [lstm.init_state(task.num_params) for _ in range(K)]
    W, y = task.W, task.y

    def instance_loss(k, theta):
        return (W[k] @ theta - y[k]).pow(2).sum()

    grads = []
    for k in range(K):
        theta = params[k].detach().requires_grad_()
        grads.append(torch.autograd.grad(instance_loss(k, theta), theta)[0])
    total = 0.0
    for _ in range(steps):
        new_grads = []
        for k in range(K):  # the per-parameter loop
            update, states[k] = lstm(grads[k], states[k])
            params[k] = params[k] + update
            loss = instance_loss(k, params[k])
            total = total + loss
            new_grads.append(torch.autograd.grad(loss, params[k], retain_graph=True)[0])
        grads = new_grads
    meta_loss = total / K
    meta_optimizer.zero_grad(set_to_none=True)
    meta_loss.backward()
    torch.nn.utils.clip_grad_norm_(lstm.parameters(), 1.0)
    meta_optimizer.step()
    return meta_loss


def time_it(fn, repeats, device):
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", type=device_arg, default="cpu")
    parser.add_argument("--instances", type=positive_int, default=128)
    parser.add_argument("--dim", type=positive_int, default=10)
    parser.add_argument("--unroll", type=positive_int, default=20)
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--json", type=output_file, help="write the figures here")
    args = parser.parse_args()
    device = torch.device(args.device)
    task = QuadraticFamily(dim=args.dim).sample(args.instances, torch.Generator().manual_seed(0), device)

    # Same meta-gradient from both paths, before any timing.
    grads = []
    for fn in (batched_iteration, loop_iteration):
        lstm = CoordinateWiseLSTM(seed=0).double().to(device)
        from l2l.tasks import QuadraticTask

        task64 = QuadraticTask(task.W.double(), task.y.double())
        optimizer = torch.optim.SGD(lstm.parameters(), lr=0.0)
        fn(lstm, optimizer, task64, 5)
        grads.append(torch.cat([p.grad.reshape(-1) for p in lstm.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-9, atol=1e-12)

    figures = {}
    for name, fn in (("batched", batched_iteration), ("per_parameter_loop", loop_iteration)):
        lstm = CoordinateWiseLSTM(seed=0).to(device)
        optimizer = torch.optim.Adam(lstm.parameters(), lr=1e-3)
        fn(lstm, optimizer, task, args.unroll)  # warm-up
        repeats = args.repeats if name == "batched" else max(2, args.repeats // 5)
        figures[name] = time_it(lambda: fn(lstm, optimizer, task, args.unroll), repeats, device)
    ratio = figures["per_parameter_loop"] / figures["batched"]
    machine = f"{platform.machine()}, {torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"meta-iteration: {args.instances} x {args.dim} coordinates, {args.unroll}-step unroll, forward + backward + meta step ({device}, {machine}, torch {torch.__version__})")
    print(f"  batched path          {figures['batched'] * 1e3:9.1f} ms")
    print(f"  per-parameter loop    {figures['per_parameter_loop'] * 1e3:9.1f} ms")
    print(f"  speed-up              {ratio:9.1f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"device": str(device), "machine": machine, "torch": torch.__version__, "seconds": figures,
                       "ratio": ratio, "instances": args.instances, "dim": args.dim, "unroll": args.unroll}, handle, indent=1)


if __name__ == "__main__":
    main()

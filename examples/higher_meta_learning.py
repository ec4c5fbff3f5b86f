"""Meta-trains a learned optimizer through higher: innerloop_ctx unrolls l2l.LearnedOptimizer differentiably.

Each outer step samples a random linear-regression task, trains a fresh nn.Linear on it for
``--inner-steps`` steps with the learned optimizer inside ``higher.innerloop_ctx`` and
backpropagates the summed inner losses (the paper's meta-loss) into the LSTM's weights; the
held-out evaluation runs in higher's test mode (``track_higher_grads=False``: the same values,
no graph). The defaults took 5-8 s on a shared 2-core CPU, about 2 s of it starting Python
and torch (12 s with cold file caches; 2026-12-04):

    python examples/higher_meta_learning.py [--outer-steps 60] [--inner-steps 10]
"""

from __future__ import annotations

import argparse

import higher
import torch
from torch import nn

import l2l
from l2l.cli import positive_float, positive_int


def sample_task(generator: torch.Generator, dim: int = 8, examples: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(examples, dim, generator=generator)
    return x, x @ torch.randn(dim, 1, generator=generator)


def inner_losses(
    rule: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int, *, differentiable: bool = True
) -> torch.Tensor:
    """Losses of a fresh model over ``steps`` learned-optimizer steps.

    Differentiable in ``rule`` unless ``differentiable=False``: higher's test mode, the same
    values without the graph through the unroll, for evaluation.
    """
    torch.manual_seed(seed)
    model = nn.Linear(x.shape[1], 1)
    optimizer = l2l.LearnedOptimizer(model.parameters(), rule)  # the live rule: gradients reach it
    losses = []
    with higher.innerloop_ctx(model, optimizer, track_higher_grads=differentiable) as (fmodel, diffopt):
        for _ in range(steps):
            loss = nn.functional.mse_loss(fmodel(x), y)
            diffopt.step(loss)
            losses.append(loss)
        losses.append(nn.functional.mse_loss(fmodel(x), y))
    return torch.stack(losses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--outer-steps", type=positive_int, default=60, help="meta-training steps, one sampled task each")
    parser.add_argument("--inner-steps", type=positive_int, default=10, help="learned-optimizer steps unrolled per task")
    parser.add_argument("--meta-lr", type=positive_float, default=3e-3, help="Adam learning rate on the LSTM's weights")
    args = parser.parse_args()
    # A 9-parameter model's tensors are far too small to split: on two shared cores a second
    # thread made the whole run 2-3x slower (21-40 s, against 9-13 s on one).
    torch.set_num_threads(1)
    rule = l2l.CoordinateWiseLSTM(seed=0)
    meta_optimizer = torch.optim.Adam(rule.parameters(), lr=args.meta_lr)
    held_out = [sample_task(torch.Generator().manual_seed(10_000 + i)) for i in range(8)]

    def held_out_final_loss() -> float:
        finals = [
            inner_losses(rule, x, y, args.inner_steps, seed=i, differentiable=False)[-1].item()
            for i, (x, y) in enumerate(held_out)
        ]
        return sum(finals) / len(finals)

    print(f"held-out final loss before meta-training: {held_out_final_loss():.4f}")
    generator = torch.Generator().manual_seed(0)
    for step in range(args.outer_steps):
        x, y = sample_task(generator)
        meta_loss = inner_losses(rule, x, y, args.inner_steps, seed=step).sum()
        meta_optimizer.zero_grad()
        meta_loss.backward()
        nn.utils.clip_grad_norm_(rule.parameters(), 1.0)
        meta_optimizer.step()
        if step % 20 == 0 or step == args.outer_steps - 1:
            print(f"outer step {step:3d}: meta-loss {meta_loss.item():.4f}")
    print(f"held-out final loss after meta-training:  {held_out_final_loss():.4f}")


if __name__ == "__main__":
    main()

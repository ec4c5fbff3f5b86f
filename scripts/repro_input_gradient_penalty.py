"""Input-gradient penalty (first-order adversarial training) versus plain training: MNIST test accuracy, clean and attacked.

Each model is an MLP (784-100-10, ReLU) trained with Adam on CE (plain) or on
l2l.objectives.input_gradient_penalty, CE + eps·||∇ₓCE||₂ per example, at several training
eps. Every model is then attacked on the 10,000 MNIST test images with the one-step attack of
l2l.objectives.adversarial_example (x + eps·∇ₓL/||∇ₓL||₂, white-box, no clipping to [0, 1]) at
several eps, and, as a check against gradient masking, with a 10-step projected version of the
same attack (PGD, step 2.5·eps/10).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from _common import nonnegative_int, positive_float, positive_int
from _objectives_repro import check_batches, minibatches, mnist, parser, setup, table, write
from torch import nn

from l2l.objectives import adversarial_example, input_gradient_penalty
from l2l.tasks.mnist import mlp

CHUNK = 2000  # Test images per attack call.


def _floats(text: str) -> tuple[float, ...]:
    """Comma-separated positive numbers, at least one."""
    try:
        values = tuple(positive_float(part) for part in text.split(",") if part.strip())
    except argparse.ArgumentTypeError:
        values = ()
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}")
    return values


def train(eps: float, data, options, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = mlp(options.hidden, 1, "relu")
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr)
    count = min(options.train_examples, len(data.y_train))
    for index in minibatches(count, options.batch_size, options.epochs, torch.Generator().manual_seed(seed)):
        x, y = data.x_train[index], data.y_train[index]
        optimizer.zero_grad()
        loss = input_gradient_penalty(model, x, y, eps, options.norm) if eps else nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
    return model


def projected_attack(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, norm: str, steps: int) -> torch.Tensor:
    """``steps`` one-step attacks of size 2.5·eps/steps, each projected back onto the eps-ball around ``x``."""
    attacked = x
    for _ in range(steps):
        attacked = adversarial_example(model, attacked, y, 2.5 * eps / steps, norm)
        delta = attacked - x
        if norm == "linf":
            delta = delta.clamp(-eps, eps)
        else:
            size = torch.linalg.vector_norm(delta.flatten(1), dim=1).clamp_min(1e-12)
            delta = delta * (eps / size).clamp(max=1.0).view(-1, *[1] * (x.dim() - 1))
        attacked = x + delta
    return attacked


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, attack=None) -> float:
    correct = 0
    for start in range(0, len(y), CHUNK):
        xs, ys = x[start : start + CHUNK], y[start : start + CHUNK]
        if attack is not None:
            xs = attack(model, xs, ys)
        with torch.no_grad():
            correct += int((model(xs).argmax(1) == ys).sum())
    return correct / len(y)


def mean_input_gradient_norm(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    x = x.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(nn.functional.cross_entropy(model(x), y, reduction="sum"), x)
    return torch.linalg.vector_norm(gradient.flatten(1), dim=1).mean().item()


def main() -> None:
    args = parser(__doc__)
    args.add_argument("--train-examples", type=positive_int, default=60000, help="MNIST training images used")
    args.add_argument("--epochs", type=positive_int, default=5, help="passes over the training images")
    args.add_argument("--hidden", type=positive_int, default=100, help="hidden ReLU units of the MLP")
    args.add_argument("--batch-size", type=positive_int, default=128, help="images per minibatch")
    args.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    args.add_argument("--norm", default="l2", choices=("l2", "linf"), help="norm of the perturbation ball (penalty and attacks)")
    args.add_argument("--train-eps", type=_floats, default="0.5,1,2,4", help="penalty eps values, comma-separated (plain training is added)")
    args.add_argument("--eval-eps", type=_floats, default="0.5,1,2,3", help="attack radii, comma-separated")
    args.add_argument("--pgd-steps", type=nonnegative_int, default=10, help="steps of the projected check attack (0: skip)")
    options = setup(args, {"input_gradient_penalty": {}})
    check_batches(args, options, "train-examples")
    data = mnist()
    x_test, y_test = data.x_test, data.y_test
    models = []
    for eps in (0.0, *options.train_eps):
        begin = time.perf_counter()
        model = train(eps, data, options, options.seed)
        seconds = time.perf_counter() - begin
        result = {
            "train_eps": eps, "train_seconds": seconds, "clean_accuracy": accuracy(model, x_test, y_test),
            "mean_test_input_gradient_norm": mean_input_gradient_norm(model, x_test, y_test),
            "one_step_accuracy": {}, "pgd_accuracy": {},
        }
        for attack_eps in options.eval_eps:
            result["one_step_accuracy"][str(attack_eps)] = accuracy(
                model, x_test, y_test, lambda m, xs, ys: adversarial_example(m, xs, ys, attack_eps, options.norm))
            if options.pgd_steps:
                result["pgd_accuracy"][str(attack_eps)] = accuracy(
                    model, x_test, y_test, lambda m, xs, ys: projected_attack(m, xs, ys, attack_eps, options.norm, options.pgd_steps))
        models.append(result)
        print(f"trained eps={eps:g} in {seconds:.0f}s", file=sys.stderr)

    header = ["training", "clean", *[f"1-step {e:g}" for e in options.eval_eps]]
    header += [f"PGD {e:g}" for e in options.eval_eps] if options.pgd_steps else []
    header.append("mean ||grad_x CE||")
    rows = []
    for r in models:
        row = ["plain" if r["train_eps"] == 0 else f"penalty eps={r['train_eps']:g}", r["clean_accuracy"]]
        row += [r["one_step_accuracy"][str(e)] for e in options.eval_eps]
        row += [r["pgd_accuracy"][str(e)] for e in options.eval_eps] if options.pgd_steps else []
        rows.append(row + [r["mean_test_input_gradient_norm"]])
    print(table(header, rows))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    radii = [0.0, *options.eval_eps]
    for index, r in enumerate(models):
        label = "plain" if r["train_eps"] == 0 else f"penalty eps={r['train_eps']:g}"
        color = f"C{index}"
        axis.plot(radii, [r["clean_accuracy"], *[r["one_step_accuracy"][str(e)] for e in options.eval_eps]], "-o", color=color, label=label)
        if options.pgd_steps:
            axis.plot(radii, [r["clean_accuracy"], *[r["pgd_accuracy"][str(e)] for e in options.eval_eps]], ":", color=color)
    axis.set_xlabel(f"attack radius eps ({options.norm}); solid: one-step, dotted: {options.pgd_steps}-step projected")
    axis.set_ylabel("MNIST test accuracy")
    axis.set_ylim(0, 1)
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    write(options, "input_gradient_penalty", {
        "experiment": "input-gradient penalty versus plain training on MNIST",
        "command": "python scripts/repro_input_gradient_penalty.py " + " ".join(sys.argv[1:]),
        "settings": {k: getattr(options, k) for k in ("train_examples", "epochs", "hidden", "batch_size", "lr", "norm",
                                                      "train_eps", "eval_eps", "pgd_steps", "seed")},
        "test_examples": len(y_test),
        "models": models,
    }, figure)


if __name__ == "__main__":
    main()

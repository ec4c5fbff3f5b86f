"""Gradient supervision on counterfactual MNIST composites versus plain training, tested on a shifted distribution.

Task: "does the composite (two 28x28 slots side by side, 28x56, digits in random slots)
contain a zero?".

* Biased training composites (from the MNIST training split): positives are a 0 beside a
  digit 1-4; negatives are two digits 5-9. "Holds a digit 1-4" predicts the label as well as
  "holds a 0": a spurious shortcut.
* Counterfactual pairs (a few, same split): x = a 0 beside a digit 1-4 (label 1); x_cf = the
  same composite with the 0 removed and a digit 5-9 pasted into its slot (label 0). The pair
  differs exactly in what makes the label, and x_cf contradicts the shortcut.
* Plain training: cross-entropy on the biased composites and on both members of every pair.
* Gradient supervision: the same plus weight · l2l.objectives.gradient_supervision_loss on the
  pairs in both directions (x -> x_cf with x_cf's label, x_cf -> x with x's label), per pair.
* Tests (from the MNIST test split): the biased distribution, and a shifted one where the
  shortcut points the wrong way: positives are a 0 beside a digit 5-9, negatives two digits 1-4.
"""

from __future__ import annotations

import argparse
import sys

import torch
from _common import positive_float, positive_int
from _objectives_repro import mnist, parser, setup, table, write
from torch import nn

from l2l.objectives import gradient_supervision_loss
from l2l.tasks.gradient_tasks import side_by_side
from l2l.tasks.mnist import mlp

LOW, HIGH = (1, 2, 3, 4), (5, 6, 7, 8, 9)


class Composer:
    """Draws digits of given classes from one MNIST split and places pairs of them in random slots."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator):
        self.images, self.labels, self.generator = images, labels, generator

    def digits(self, classes: tuple[int, ...], count: int) -> torch.Tensor:
        pool = torch.nonzero(torch.isin(self.labels, torch.tensor(classes))).squeeze(1)
        return self.images[pool[torch.randint(0, len(pool), (count,), generator=self.generator)]]

    def slots(self, count: int) -> torch.Tensor:
        return (torch.rand(count, generator=self.generator) < 0.5).view(-1, 1, 1, 1)

    @staticmethod
    def place(first: torch.Tensor, second: torch.Tensor, first_left: torch.Tensor) -> torch.Tensor:
        return side_by_side(torch.where(first_left, first, second), torch.where(first_left, second, first))

    def composites(self, first: tuple[int, ...], second: tuple[int, ...], count: int) -> torch.Tensor:
        return self.place(self.digits(first, count), self.digits(second, count), self.slots(count))

    def labelled(self, positive: tuple[tuple[int, ...], tuple[int, ...]], negative: tuple[tuple[int, ...], tuple[int, ...]],
                 count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` composites, half positive (a 0 and a digit of ``positive[1]``), half negative."""
        half = count // 2
        x = torch.cat([self.composites(*positive, half), self.composites(*negative, count - half)])
        return x, torch.cat([torch.ones(half, dtype=torch.long), torch.zeros(count - half, dtype=torch.long)])

    def counterfactual_pairs(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, x_cf)``: a 0 beside a digit 1-4, and the same with a digit 5-9 pasted over the 0."""
        companion, first_left = self.digits(LOW, count), self.slots(count)
        return (self.place(self.digits((0,), count), companion, first_left),
                self.place(self.digits(HIGH, count), companion, first_left))


def train(weight: float, biased, pairs, options, seed: int) -> nn.Module:
    (x_biased, y_biased), (x, x_cf) = biased, pairs
    torch.manual_seed(seed)
    model = mlp(options.hidden, 1, "relu", inputs=28 * 56, classes=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=options.lr)
    generator = torch.Generator().manual_seed(seed)
    steps = options.epochs * len(y_biased) // options.batch_size
    for _ in range(steps):
        index = torch.randint(0, len(y_biased), (options.batch_size,), generator=generator)
        pair = torch.randint(0, len(x), (options.batch_pairs,), generator=generator)
        members = torch.cat([x[pair], x_cf[pair]])
        member_labels = torch.cat([torch.ones(len(pair), dtype=torch.long), torch.zeros(len(pair), dtype=torch.long)])
        loss = nn.functional.cross_entropy(model(torch.cat([x_biased[index], members])), torch.cat([y_biased[index], member_labels]))
        if weight:
            counterfactuals = torch.cat([x_cf[pair], x[pair]])  # Each member's counterfactual is the other.
            loss = loss + weight * gradient_supervision_loss(model, members, counterfactuals, 1 - member_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).double().mean().item()


def _weights(text: str) -> str:
    """``text`` if it is comma-separated positive numbers, at least one (a 0 would repeat the plain run that is always added)."""
    try:
        values = [positive_float(part) for part in text.split(",") if part.strip()]
    except argparse.ArgumentTypeError:
        values = []
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive numbers, got {text!r}")
    return text


def main() -> None:
    args = parser(__doc__)
    args.add_argument("--biased-examples", type=positive_int, default=4000, help="biased training composites")
    args.add_argument("--pairs", type=positive_int, default=200, help="counterfactual training pairs")
    args.add_argument("--test-examples", type=positive_int, default=2000, help="composites per test set")
    args.add_argument("--epochs", type=positive_int, default=10, help="passes over the biased composites")
    args.add_argument("--hidden", type=positive_int, default=64, help="hidden ReLU units of the MLP")
    args.add_argument("--batch-size", type=positive_int, default=64, help="biased composites per minibatch")
    args.add_argument("--batch-pairs", type=positive_int, default=16, help="pairs per minibatch")
    args.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    args.add_argument("--weights", type=_weights, default="1,10", help="positive gradient-supervision weights, comma-separated (plain training is added)")
    args.add_argument("--seeds", type=positive_int, default=5, help="training runs per weight")
    options = setup(args, {"gradient_supervision": {}})
    if options.epochs * options.biased_examples < options.batch_size:  # steps = epochs x biased examples // batch size
        args.error(f"--epochs {options.epochs} x --biased-examples {options.biased_examples} is less than one --batch-size "
                   f"{options.batch_size}: no training step; pass more examples or epochs or a smaller --batch-size")
    weights = (0.0, *(float(w) for w in options.weights.split(",") if w.strip()))
    data = mnist()
    training = Composer(data.x_train, data.y_train, torch.Generator().manual_seed(10))
    biased = training.labelled(((0,), LOW), (HIGH, HIGH), options.biased_examples)
    pairs = training.counterfactual_pairs(options.pairs)
    testing = Composer(data.x_test, data.y_test, torch.Generator().manual_seed(11))
    in_x, in_y = testing.labelled(((0,), LOW), (HIGH, HIGH), options.test_examples)
    shifted_x, shifted_y = testing.labelled(((0,), HIGH), (LOW, LOW), options.test_examples)
    test_x, test_cf = testing.counterfactual_pairs(options.test_examples // 2)
    runs = []
    for weight in weights:
        for seed in range(options.seed, options.seed + options.seeds):
            model = train(weight, biased, pairs, options, seed)
            with torch.no_grad():
                alignment = 1 - gradient_supervision_loss(model, test_x, test_cf, torch.zeros(len(test_x), dtype=torch.long))
            runs.append({
                "gs_weight": weight, "seed": seed, "in_distribution_accuracy": accuracy(model, in_x, in_y),
                "shifted_accuracy": accuracy(model, shifted_x, shifted_y),
                "shifted_accuracy_without_zero": accuracy(model, shifted_x[shifted_y == 0], shifted_y[shifted_y == 0]),
                "shifted_accuracy_with_zero": accuracy(model, shifted_x[shifted_y == 1], shifted_y[shifted_y == 1]),
                "test_gradient_alignment": alignment.item(),
            })
            print(f"weight {weight:g} seed {seed}: in-distribution {runs[-1]['in_distribution_accuracy']:.3f} "
                  f"shifted {runs[-1]['shifted_accuracy']:.3f}", file=sys.stderr)

    keys = ("in_distribution_accuracy", "shifted_accuracy", "shifted_accuracy_without_zero", "shifted_accuracy_with_zero",
            "test_gradient_alignment")

    def summary(weight: float, key: str) -> tuple[float, float]:
        values = torch.tensor([r[key] for r in runs if r["gs_weight"] == weight], dtype=torch.float64)
        return values.mean().item(), values.std().item() if len(values) > 1 else 0.0

    rows = [["plain" if w == 0 else f"GS weight {w:g}", *(f"{m:.3f} ± {s:.3f}" for m, s in (summary(w, k) for k in keys))]
            for w in weights]
    print(table(["training", "in-distribution", "shifted", "shifted, no zero", "shifted, with zero", "test cos(g, x_cf - x)"], rows))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.8))
    width = 0.8 / len(weights)
    for index, weight in enumerate(weights):
        stats = [summary(weight, key) for key in keys[:4]]
        axis.bar([k + index * width for k in range(4)], [m for m, _ in stats], width, yerr=[s for _, s in stats], capsize=3,
                 label="plain" if weight == 0 else f"gradient supervision, weight {weight:g}")
    axis.set_xticks([k + width * (len(weights) - 1) / 2 for k in range(4)],
                    ["in-distribution", "shifted", "shifted:\nno zero", "shifted:\nwith zero"])
    axis.set_ylabel(f"test accuracy (mean ± sd, {options.seeds} seeds)")
    axis.set_ylim(0, 1.05)
    axis.legend(fontsize=8, loc="lower left")
    axis.grid(axis="y", alpha=0.3)
    write(options, "gradient_supervision", {
        "experiment": "gradient supervision on counterfactual MNIST composites, shifted test",
        "command": "python scripts/repro_gradient_supervision.py " + " ".join(sys.argv[1:]),
        "settings": {k: getattr(options, k) for k in ("biased_examples", "pairs", "test_examples", "epochs", "hidden", "batch_size",
                                                      "batch_pairs", "lr", "weights", "seeds", "seed")},
        "runs": runs,
    }, figure)


if __name__ == "__main__":
    main()

"""Gradient reversal on two-digit MNIST composites: a "contains a zero?" head and an adversary naming the other digit.

The data are mnist-grl's (l2l.tasks.gradient_tasks.zero_composites: a 0 and a digit 1-9, or two
digits 1-9, side by side). The net is l2l.tasks.gradient_tasks.TwoHeadNet: shared features, a
label head, and an adversary head behind l2l.objectives.GradReverse that names the other digit
of composites containing a zero. Two settings, same data, seeds and steps:

* reversal: λ follows Ganin & Lempitsky's schedule 2/(1+exp(-10·progress)) - 1, so the
  features are trained to hide the other digit while the adversary tries to read it;
* no reversal: λ = 0, so the features learn from the label head only and the adversary is
  a probe trained alongside.

After training, fresh probes (linear, and one hidden layer of 64 ReLU units) are fitted on the
frozen features to name the other digit: they tell whether the information is gone or the
adversary was merely beaten.
"""

from __future__ import annotations

import sys

import torch
from _common import nonnegative_int, positive_float, positive_int
from _objectives_repro import check_batches, minibatches, parser, setup, table, write
from torch import nn

from l2l.data.base import data_dir
from l2l.objectives import reversal_coefficient
from l2l.tasks.gradient_tasks import TwoHeadNet, two_head_accuracies, two_head_loss, zero_composite_tensors
from l2l.tasks.mnist import ACTIVATIONS

SETTINGS = {"reversal": True, "no reversal": False}


def evaluate(net: TwoHeadNet, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    net.eval()
    with torch.no_grad():
        label_accuracy, adversary_accuracy = two_head_accuracies(net(x), y)
    net.train()
    return label_accuracy.item(), adversary_accuracy.item()


def train(reverse: bool, data, options, seed: int) -> tuple[TwoHeadNet, dict[str, list[float]]]:
    torch.manual_seed(seed)
    net = TwoHeadNet(options.hidden, options.activation, coeff=0.0, adversary_hidden=options.adversary_hidden)
    optimizer = torch.optim.Adam(net.parameters(), lr=options.lr)
    batches = list(minibatches(len(data.y_train), options.batch_size, options.epochs, torch.Generator().manual_seed(seed)))
    curves: dict[str, list[float]] = {"step": [], "coeff": [], "label_accuracy": [], "adversary_accuracy": []}
    for step, index in enumerate(batches):
        net.reverse.coeff = reversal_coefficient(step / len(batches)) if reverse else 0.0
        if step % options.eval_every == 0:
            label_accuracy, adversary_accuracy = evaluate(net, data.x_test, data.y_test)
            for key, value in zip(curves, (step, net.reverse.coeff, label_accuracy, adversary_accuracy)):
                curves[key].append(value)
        optimizer.zero_grad()
        two_head_loss(net, data.x_train[index], data.y_train[index]).backward()
        optimizer.step()
    label_accuracy, adversary_accuracy = evaluate(net, data.x_test, data.y_test)
    for key, value in zip(curves, (len(batches), net.reverse.coeff, label_accuracy, adversary_accuracy)):
        curves[key].append(value)
    return net, curves


def probe_accuracy(net: TwoHeadNet, data, options, seed: int, hidden: int) -> float:
    """Test accuracy of a fresh probe (linear if ``hidden`` is 0, else one ReLU layer) naming the other digit from the frozen features."""
    with torch.no_grad():
        net.eval()
        train_features, test_features = net.features(data.x_train), net.features(data.x_test)
    keep_train, keep_test = data.y_train[:, 1] >= 0, data.y_test[:, 1] >= 0
    features, targets = train_features[keep_train], data.y_train[keep_train, 1]
    torch.manual_seed(seed)
    if hidden:
        probe = nn.Sequential(nn.Linear(features.shape[1], hidden), nn.ReLU(), nn.Linear(hidden, TwoHeadNet.ADVERSARY_CLASSES))
    else:
        probe = nn.Linear(features.shape[1], TwoHeadNet.ADVERSARY_CLASSES)
    optimizer = torch.optim.Adam(probe.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(options.probe_steps):
        index = torch.randint(0, len(targets), (256,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(probe(features[index]), targets[index]).backward()
        optimizer.step()
    with torch.no_grad():
        return (probe(test_features[keep_test]).argmax(1) == data.y_test[keep_test, 1]).double().mean().item()


def main() -> None:
    args = parser(__doc__)
    args.add_argument("--train-examples", type=positive_int, default=20000, help="training composites (from the MNIST training split)")
    args.add_argument("--test-examples", type=positive_int, default=2000, help="test composites (from the MNIST test split)")
    args.add_argument("--epochs", type=positive_int, default=5, help="passes over the training composites")
    args.add_argument("--hidden", type=positive_int, default=64, help="units of the shared features")
    args.add_argument("--activation", default="relu", choices=tuple(ACTIVATIONS), help="activation of the shared features")
    args.add_argument("--adversary-hidden", type=nonnegative_int, default=64, help="hidden units of the adversary head (0: linear)")
    args.add_argument("--batch-size", type=positive_int, default=128, help="composites per minibatch")
    args.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate")
    args.add_argument("--eval-every", type=positive_int, default=50, help="steps between test evaluations")
    args.add_argument("--probe-steps", type=positive_int, default=1500, help="Adam steps of the post-hoc probe")
    args.add_argument("--seeds", type=positive_int, default=3, help="training runs per setting")
    options = setup(args, {"gradient_reversal": {}})
    check_batches(args, options, "train-examples")
    data = zero_composite_tensors(str(data_dir()), "cpu", options.train_examples, options.test_examples)
    runs = []
    for name, reverse in SETTINGS.items():
        for seed in range(options.seed, options.seed + options.seeds):
            net, curves = train(reverse, data, options, seed)
            runs.append({"setting": name, "seed": seed, "curves": curves, "final_label_accuracy": curves["label_accuracy"][-1],
                         "final_adversary_accuracy": curves["adversary_accuracy"][-1],
                         "linear_probe_accuracy": probe_accuracy(net, data, options, seed, hidden=0),
                         "mlp_probe_accuracy": probe_accuracy(net, data, options, seed, hidden=64)})
            print(f"{name} seed {seed}: label {runs[-1]['final_label_accuracy']:.3f} adversary "
                  f"{runs[-1]['final_adversary_accuracy']:.3f} probes {runs[-1]['linear_probe_accuracy']:.3f} "
                  f"{runs[-1]['mlp_probe_accuracy']:.3f}", file=sys.stderr)

    def mean_and_spread(setting: str, key: str) -> str:
        values = torch.tensor([r[key] for r in runs if r["setting"] == setting], dtype=torch.float64)
        return f"{values.mean():.3f} ({values.min():.3f}-{values.max():.3f})"

    keys = ("final_label_accuracy", "final_adversary_accuracy", "linear_probe_accuracy", "mlp_probe_accuracy")
    print(table(["setting", "label head (zero?)", "adversary (other digit)", "fresh linear probe", "fresh MLP probe"],
                [[name, *(mean_and_spread(name, key) for key in keys)] for name in SETTINGS]))
    print(f"chance: label head {(data.y_test[:, 0] == 1).double().mean():.3f} (majority), other digit 1/9 = 0.111")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for color, name in zip(("C3", "C0"), SETTINGS):
        for r in (r for r in runs if r["setting"] == name):
            label = name if r["seed"] == options.seed else None
            axes[0].plot(r["curves"]["step"], r["curves"]["label_accuracy"], color=color, alpha=0.8, label=label)
            axes[1].plot(r["curves"]["step"], r["curves"]["adversary_accuracy"], color=color, alpha=0.8, label=label)
    axes[0].set_title("label head: contains a zero? (test)")
    axes[1].set_title("adversary head: the other digit (test, composites with a zero)")
    axes[1].axhline(1 / 9, color="0.5", ls=":", label="chance 1/9")
    for axis in axes:
        axis.set_xlabel("training step")
        axis.set_ylabel("accuracy")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    write(options, "gradient_reversal", {
        "experiment": "two-head MNIST composites with and without gradient reversal",
        "command": "python scripts/repro_gradient_reversal.py " + " ".join(sys.argv[1:]),
        "settings": {k: getattr(options, k) for k in ("train_examples", "test_examples", "epochs", "hidden", "activation",
                                                      "adversary_hidden", "batch_size", "lr", "eval_every", "probe_steps",
                                                      "seeds", "seed")},
        "runs": runs,
    }, figure)


if __name__ == "__main__":
    main()

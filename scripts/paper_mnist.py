"""Paper, section 3.2: the MNIST-trained LSTM versus tuned baselines on the MNIST MLP at 100 and 200 steps."""

from _experiment import bench, parse, parser, train

# The recipe of the shipped checkpoints/mnist.pt (see checkpoints/README.md).
RECIPE = ["--task", "mnist", "--instances", "2", "--epochs", "1500", "--meta-lr", "1e-2", "--meta-lr-schedule", "cosine",
          "--val-every", "100", "--val-problems", "16"]

if __name__ == "__main__":
    options = parse(parser(__doc__, checkpoint="mnist", problems=32))
    if options.train:
        options.checkpoint = train(options, RECIPE, "paper-mnist")
    for steps in (100, 200):
        bench(options, f"mnist-{steps}", "mnist", steps=steps, extra=["--tune-problems", "32"])

"""Beyond the paper: where its MNIST optimizer fails. The optimizer fine-tuned on the ReLU MLP, and the shipped mnist one, versus tuned baselines."""

from _experiment import bench, parse, parser, train

RECIPE = ["--task", "mnist-relu", "--init-from", "mnist", "--instances", "1", "--meta-lr", "3e-3", "--meta-lr-schedule", "cosine",
          "--epochs", "150", "--val-every", "25", "--val-problems", "16"]

if __name__ == "__main__":
    options = parse(parser(__doc__, checkpoint="mnist-relu", problems=32))
    if options.train:
        options.checkpoint = train(options, RECIPE, "mnist-relu-ft")
    for steps in (100, 200):
        bench(options, f"mnist-relu-ft-{steps}", "mnist-relu", steps=steps, extra=["--optimizer", "mnist", "--tune-problems", "32"])

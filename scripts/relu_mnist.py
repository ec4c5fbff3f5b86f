"""Beyond the paper: where its MNIST optimizer fails. The optimizer fine-tuned on the ReLU MLP, and the shipped mnist one, versus tuned baselines."""

from _experiment import bench, parser, train

RECIPE = ["--task", "mnist-relu", "--init-from", "mnist", "--instances", "1", "--meta-lr", "3e-3", "--meta-lr-schedule", "cosine",
          "--epochs", "150", "--val-every", "25", "--val-problems", "16"]

if __name__ == "__main__":
    options = parser(__doc__, checkpoint="mnist-relu").parse_args()
    if options.train:
        options.checkpoint = train(options, RECIPE, options.out.parent.parent / "runs" / "mnist-relu-ft")
    for steps in (100, 200):
        bench(options, f"mnist-relu-ft-{steps}", "mnist-relu", steps=steps, problems=32,
              extra=["--optimizer", "mnist", "--tune-problems", "32"])

"""Beyond the paper: 10x its horizon. The quadratic optimizer fine-tuned on 1,000-step runs, and the shipped one, versus tuned baselines at 1,000 steps."""

from _experiment import bench, parse, parser, train

RECIPE = ["--task", "quadratic", "--init-from", "quadratic", "--optimizee-steps", "1000", "--epochs", "100", "--meta-lr", "1e-3",
          "--meta-lr-schedule", "cosine", "--val-every", "10", "--val-problems", "256", "--checkpoint-every", "10"]

if __name__ == "__main__":
    options = parse(parser(__doc__, checkpoint="quadratic-1000", problems=512))
    if options.train:
        options.checkpoint = train(options, RECIPE, "quadratic-1000-ft")
    bench(options, "quadratic-1000", "quadratic", steps=1000, extra=["--optimizer", "quadratic"])

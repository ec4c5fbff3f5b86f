"""Paper, section 3.3: the CIFAR-10-trained LSTM (separate LSTMs for conv and fully connected layers) on CIFAR-10, -5 and -2."""

from _experiment import bench, parser, train

# The recipe of the shipped checkpoints/cifar10.pt (see checkpoints/README.md). Both LSTMs start
# from the shipped MNIST optimizer (a CPU-sized budget; the paper trained from scratch).
RECIPE = ["--task", "cifar10", "--split", "conv,fc", "--init-from", "mnist", "--instances", "1", "--meta-lr", "3e-3",
          "--meta-lr-schedule", "cosine", "--epochs", "150", "--val-every", "25", "--val-problems", "4"]
# Conv nets are slow on a CPU: a narrower learning-rate grid (1e-4 ... 1 in half-decades) and
# fewer instances than the MLP experiments.
GRID = ["--lr-grid", "0.0001,0.000316,0.001,0.00316,0.01,0.0316,0.1,0.316,1", "--tune-problems", "4"]
TASKS = ("cifar10", "cifar5", "cifar2")

if __name__ == "__main__":
    args = parser(__doc__, checkpoint="cifar10")
    args.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    args.add_argument("--baselines", help="comma-separated baselines for the subsets cifar5, cifar2 (default: all five)")
    options = args.parse_args()
    if options.train:
        options.checkpoint = train(options, RECIPE, options.out.parent.parent / "runs" / "paper-cifar10")
    for task in options.tasks.split(","):
        baselines = ["--baselines", options.baselines] if options.baselines and task != "cifar10" else []
        bench(options, f"{task}-100", task, steps=100, problems=8, extra=GRID + baselines)

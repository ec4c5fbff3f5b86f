"""Paper, section 3.1: the LSTM optimizer versus tuned baselines on 10-d quadratics (100 steps, 512 instances)."""

from _experiment import bench, parser, train

RECIPE = ["--task", "quadratic"]  # l2l train defaults are the paper's setting

if __name__ == "__main__":
    options = parser(__doc__, checkpoint="quadratic").parse_args()
    if options.train:
        options.checkpoint = train(options, RECIPE, options.out.parent.parent / "runs" / "paper-quadratic")
    bench(options, "quadratic-100", "quadratic", steps=100, problems=512)

"""Paper, section 3.1: the LSTM optimizer versus tuned baselines on 10-d quadratics (100 steps, 512 instances)."""

from _experiment import bench, parse, parser, train

RECIPE = ["--task", "quadratic"]  # the l2l train defaults: the paper's but for the preprocessing (README, "Where l2l departs from the paper")

if __name__ == "__main__":
    options = parse(parser(__doc__, checkpoint="quadratic", problems=512))
    if options.train:
        options.checkpoint = train(options, RECIPE, "paper-quadratic")
    bench(options, "quadratic-100", "quadratic", steps=100)

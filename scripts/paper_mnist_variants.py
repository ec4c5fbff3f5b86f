"""Paper, section 3.2 (generalisation): the MNIST-trained LSTM on other architectures: 40 units, two layers, ReLU."""

from _experiment import bench, parse, parser

if __name__ == "__main__":
    options = parse(parser(__doc__, checkpoint="mnist", problems=32, train=False))
    for task in ("mnist-40", "mnist-2layer", "mnist-relu"):
        bench(options, f"{task}-200", task, steps=200, extra=["--tune-problems", "32"])

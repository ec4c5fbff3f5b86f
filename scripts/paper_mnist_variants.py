"""Paper, section 3.2 (generalisation): the MNIST-trained LSTM on other architectures: 40 units, two layers, ReLU."""

from _experiment import bench, parser

if __name__ == "__main__":
    options = parser(__doc__, checkpoint="mnist").parse_args()
    for task in ("mnist-40", "mnist-2layer", "mnist-relu"):
        bench(options, f"{task}-200", task, steps=200, problems=32, extra=["--tune-problems", "32"])

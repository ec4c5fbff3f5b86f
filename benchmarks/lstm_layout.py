"""One coordinatewise LSTM step (2 layers x 20 units, forward only), feature-major versus coordinate-major.

Feature-major (l2l's kernels/reference.py): states [layers, hidden, N], gates [4H, N], each gate a
contiguous block. Coordinate-major: states [N, hidden], gates [N, 4H] as nn.LSTMCell computes them.

    python benchmarks/lstm_layout.py [--sizes 16000,256000] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from l2l.kernels.reference import coordinatewise_lstm
from l2l.optimizers import CoordinateWiseLSTM
from l2l.optimizers.preprocess import log_and_sign
from l2l.cli import output_file, positive_int, positive_int_list


def coordinate_major_step(x, states, cells):
    layer_input = x
    new_states = []
    for cell, (h, c) in zip(cells, states):
        h, c = cell(layer_input, (h, c))
        new_states.append((h, c))
        layer_input = h
    return layer_input, new_states


def median_seconds(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=positive_int_list, default="16000,256000", help="coordinates, comma-separated")
    parser.add_argument("--repeats", type=positive_int, default=10)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--json", type=output_file)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lstm = CoordinateWiseLSTM(seed=0)
    cells = [torch.nn.LSTMCell(2, 20), torch.nn.LSTMCell(20, 20)]
    rows = []
    with torch.no_grad():
        for n in args.sizes:
            grad = torch.randn(n)
            x = log_and_sign(grad)
            h, c = lstm.init_state(n)
            h.normal_(), c.normal_()
            feature = median_seconds(lambda: coordinatewise_lstm(x, h, c, lstm.weights()), args.repeats)
            xt = x.t().contiguous()
            states = [(torch.randn(n, 20), torch.randn(n, 20)) for _ in cells]
            coordinate = median_seconds(lambda: coordinate_major_step(xt, states, cells), args.repeats)
            rows.append({"coordinates": n, "feature_major_s": feature, "coordinate_major_s": coordinate,
                         "speedup": coordinate / feature})
    print(f"LSTM step (2 x 20, forward), {args.threads} threads, torch {torch.__version__}")
    print(f"{'N':>9} {'feature-major':>14} {'coordinate-major':>17} {'ratio':>6}")
    for row in rows:
        print(f"{row['coordinates']:>9,} {row['feature_major_s'] * 1e3:>11.1f} ms {row['coordinate_major_s'] * 1e3:>14.1f} ms "
              f"{row['speedup']:>5.1f}x")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Plot transformer_dyt_curves.csv: training loss per norm, mean over seeds +- sd.

usage: plot_transformer_dyt.py [DIR]   (writes DIR/transformer_dyt.png)
"""
import csv
import math
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "."
    curves = defaultdict(lambda: defaultdict(list))  # norm -> step -> losses over seeds
    with open(os.path.join(d, "transformer_dyt_curves.csv")) as f:
        for r in csv.DictReader(f):
            curves[r["norm"]][int(r["step"])].append(float(r["train_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for norm, by_step in curves.items():
        steps = sorted(by_step)
        mean = [sum(by_step[s]) / len(by_step[s]) for s in steps]
        sd = [math.sqrt(sum((v - m) ** 2 for v in by_step[s]) / max(1, len(by_step[s]) - 1))
              for s, m in zip(steps, mean)]
        n = len(by_step[steps[0]])
        ax.plot(steps, mean, label=f"{norm} ({n} seeds)")
        ax.fill_between(steps, [m - s for m, s in zip(mean, sd)], [m + s for m, s in zip(mean, sd)], alpha=0.2)
    ax.set_yscale("log")
    ax.set(xlabel="training step", ylabel="training cross-entropy (mean +- sd over seeds)",
           title="one pre-norm Transformer block sorting 16 tokens")
    ax.legend()
    fig.tight_layout()
    out = os.path.join(d, "transformer_dyt.png")
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Plot batchnorm_running_stats.csv and batchnorm_train_eval.csv.

usage: plot_batchnorm_train_eval.py [DIR]   (writes DIR/batchnorm_train_eval.png)
"""
import csv
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(d, name):
    with open(os.path.join(d, name)) as f:
        return list(csv.DictReader(f))


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "."
    stats = read(d, "batchnorm_running_stats.csv")
    gap = read(d, "batchnorm_train_eval.csv")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for col, label in (("mean_error", "running_mean error (in sd)"), ("var_error", "running_var error (relative)")):
        a1.semilogy([int(r["step"]) for r in stats], [float(r[col]) for r in stats], label=label)
    frozen = [int(r["step"]) for r in stats if r["phase"] == "frozen"]
    if frozen:
        a1.axvline(frozen[0], color="gray", ls="--", lw=1)
        a1.text(frozen[0], a1.get_ylim()[1], " weights frozen", va="top", fontsize=8)
    a1.set(xlabel="step", ylabel="max over channels", title="running statistics vs data-set statistics")
    a1.legend(fontsize=8)
    a2.loglog([int(r["batch"]) for r in gap], [float(r["mean_abs_train_minus_eval"]) for r in gap], "o-")
    a2.set(xlabel="batch size", ylabel="mean |y_train - y_eval|", title="train-mode vs eval-mode output")
    fig.tight_layout()
    out = os.path.join(d, "batchnorm_train_eval.png")
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()

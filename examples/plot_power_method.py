#!/usr/bin/env python3
"""Plot power_method.csv: angle to the top eigenvector and length of the iterate.

usage: plot_power_method.py [DIR]   (reads DIR/power_method.csv, writes DIR/power_method.png)
"""
import csv
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    d = sys.argv[1] if len(sys.argv) > 1 else "."
    with open(os.path.join(d, "power_method.csv")) as f:
        rows = list(csv.DictReader(f))
    it = [int(r["iter"]) for r in rows]
    names = [k[len("angle "):] for k in rows[0] if k.startswith("angle ")]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for n in names:
        ang = [float(r["angle " + n]) for r in rows]
        ln = [float(r["length " + n]) for r in rows]
        style = "--" if "0.25" in n else "-"
        a1.semilogy(it, [a if math.isfinite(a) and a > 0 else float("nan") for a in ang], style, label=n)
        a2.semilogy(it, [v if math.isfinite(v) and v > 0 else float("nan") for v in ln], style, label=n)
    a1.set(xlabel="iteration", ylabel="angle to top eigenvector (rad)",
           title="x <- norm(x A): direction")
    a2.set(xlabel="iteration", ylabel="|x|", title="length (raw: until inf/NaN or 0)")
    a1.legend(fontsize=8)
    a2.legend(fontsize=8)
    fig.tight_layout()
    out = os.path.join(d, "power_method.png")
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()

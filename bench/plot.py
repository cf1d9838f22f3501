#!/usr/bin/env python3
"""PNG charts from a normkit_bench JSON (Debian python3-matplotlib).

  python3 bench/plot.py results.json docs/img

Writes, per layer and direction, <layer>_<direction>.png: GB/s of normkit, each peer
and memcpy across shapes, one panel per thread count; and dyt_question_<t>t.png: DyT,
LayerNorm and RMSNorm time, forward and backward, per shape, for normkit and the peers
(a missing bar: that library has no such kernel, e.g. oneDNN 2.6 has no RMSNorm).
compare.py --plots DIR calls write_all() after a run.
"""
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import compare  # noqa: E402

COLORS = {"normkit": "#1f77b4", "oneDNN": "#ff7f0e", "torch": "#d62728", "Eigen expr": "#9467bd",
          "memcpy": "#7f7f7f"}
LAYER_COLORS = {"DyT": "#2ca02c", "LayerNorm": "#1f77b4", "RMSNorm": "#ff7f0e"}


def layer_chart(table, layer, direction, path):
    keys = [k for k in table if k[0] == layer and k[1] == direction]
    shapes = sorted({k[2] for k in keys}, key=compare.shape_rank)
    threads = sorted({k[3] for k in keys})
    libs = ["normkit"] + [p for p in compare.PEER_ORDER if any(p in table[k] for k in keys)] + ["memcpy"]
    fig, axes = plt.subplots(1, len(threads), figsize=(max(7.0, 4.2 * len(threads) + 1), 3.8), squeeze=False, sharey=True)
    width = 0.8 / len(libs)
    for ax, t in zip(axes[0], threads):
        for i, lib in enumerate(libs):
            vals = []
            for s in shapes:
                row = table.get((layer, direction, s, t), {})
                if lib == "memcpy":
                    nk = row.get("normkit")
                    vals.append(nk["memcpy"] if nk and nk["memcpy"] else 0)
                else:
                    r = row.get(lib)
                    vals.append(r["gbps"] if r and not r["error"] and r["gbps"] else 0)
            xs = [j + (i - (len(libs) - 1) / 2) * width for j in range(len(shapes))]
            ax.bar(xs, vals, width, label=lib, color=COLORS.get(lib),
                   hatch="//" if lib == "memcpy" else None, alpha=0.5 if lib == "memcpy" else 1)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([s.replace(" ", "\n") for s in shapes], fontsize=8)
        ax.set_title("%d thread%s" % (t, "" if t == 1 else "s"), fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("GB/s (minimum traffic)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("%s %s, fp32: normkit vs peers vs memcpy (higher is better)" % (layer, direction), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dyt_chart(table, threads, path):
    """Rows forward/backward, one panel per shape; bars DyT/LayerNorm/RMSNorm per library."""
    shapes = sorted({k[2] for k in table if k[0] == "DyT" and k[3] == threads}, key=compare.shape_rank)
    libs = [l for l in ["normkit", "torch", "oneDNN", "Eigen expr"]
            if any(l in v for k, v in table.items() if k[0] == "DyT" and k[3] == threads)]
    fig, axes = plt.subplots(2, len(shapes), figsize=(4.2 * len(shapes) + 1, 6.5), squeeze=False)
    for row, direction in enumerate(["Forward", "Backward"]):
        for col, shape in enumerate(shapes):
            ax = axes[row][col]
            for i, layer in enumerate(["DyT", "LayerNorm", "RMSNorm"]):
                vals = []
                for lib in libs:
                    r = table.get((layer, direction, shape, threads), {}).get(lib)
                    vals.append(r["time_us"] if r and not r["error"] else 0)
                xs = [j + (i - 1) * 0.27 for j in range(len(libs))]
                ax.bar(xs, vals, 0.27, label=layer, color=LAYER_COLORS[layer])
            ax.set_xticks(range(len(libs)))
            ax.set_xticklabels(libs, fontsize=8)
            ax.set_yscale("log")
            ax.set_title("%s %s" % (direction, shape), fontsize=10)
            ax.grid(axis="y", alpha=0.3, which="both")
            if col == 0:
                ax.set_ylabel("time per call, us (lower is better)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Is DyT cheaper than LayerNorm / RMSNorm? fp32, %d thread%s" % (threads, "" if threads == 1 else "s"),
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_all(table, folder):
    """Writes every chart into `folder`; returns the file names."""
    os.makedirs(folder, exist_ok=True)
    names = []
    pairs = sorted({(k[0], k[1]) for k in table if "normkit" in table[k] and k[0] in compare.LAYERS},
                   key=lambda p: (compare.LAYERS.index(p[0]), compare.DIRECTIONS.index(p[1])))
    for layer, direction in pairs:
        name = "%s_%s.png" % (layer.lower(), direction.lower())
        layer_chart(table, layer, direction, os.path.join(folder, name))
        names.append(name)
    for t in sorted({k[3] for k in table if k[0] == "DyT"}):
        name = "dyt_question_%dt.png" % t
        dyt_chart(table, t, os.path.join(folder, name))
        names.append(name)
    return names


def main():
    if len(sys.argv) != 3:
        sys.exit("usage: plot.py RESULTS.json OUTPUT_FOLDER")
    table, _ = compare.load(sys.argv[1])
    for name in write_all(table, sys.argv[2]):
        print(os.path.join(sys.argv[2], name))


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Runs normkit_bench (normkit, its peers and the memcpy roofline in one process) and
prints a one-screen summary: per layer, direction, shape and thread count, normkit's
GB/s, its fraction of memcpy, and its speed relative to the best peer ("0.80x torch !"
marks a row where normkit is behind).

  python3 bench/compare.py --quick                 # < 5 minutes on 2 cores
  python3 bench/compare.py --threads 1,2,all       # 1, 2 and every core
  python3 bench/compare.py --json results.json     # summarize an earlier run
  python3 bench/compare.py --quick --markdown docs/benchmarks.md   # the docs page

Ratios are normkit GB/s over peer GB/s on the same bytes (minimum traffic), so > 1
means normkit is faster. Peers: oneDNN, libtorch (when compiled in) and, for DyT, the
Eigen Tensor expression a user would write.
"""
import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_BIN = os.path.join(ROOT, "build", "release", "bench", "normkit_bench")

PEERS = {"OneDNN": "oneDNN", "Torch": "torch", "DyTEigen": "Eigen expr"}
PEER_ORDER = ["oneDNN", "torch", "Eigen expr"]
LAYERS = ["LayerNorm", "RMSNorm", "DyT", "BatchNorm"]
DIRECTIONS = ["Forward", "Backward", "TrainForward", "TrainBackward", "EvalForward"]
# BatchNorm shape name (the benchmark's label, from nkbench::kBatchNormShapes in
# bench/common.hpp) -> its `shape` argument, the order the tables list them in; filled by
# load().
BN_ORDER = {}


def parse_name(name, label=""):
    """'BM_Torch_LayerNorm_Forward/rows:128/features:768/threads:1/real_time' ->
    (library, layer, direction, shape, threads), or None for rows outside the table. A
    BatchNorm row's shape is its label (the `shape` argument where it has none)."""
    parts = name.split("/")
    base = parts[0]
    args = {}
    for p in parts[1:]:
        if ":" in p:
            k, v = p.rsplit(":", 1)
            args[k] = int(v)
    m = re.match(r"BM_(?:(OneDNN|Torch)_)?(DyTEigen|LayerNorm|RMSNorm|DyT|BatchNorm|Memcpy)(?:_(\w+))?$", base)
    if not m or "threads" not in args:
        return None
    lib = PEERS.get(m.group(1) or m.group(2), "normkit")
    layer = "DyT" if m.group(2) == "DyTEigen" else m.group(2)
    direction = m.group(3) or ""
    if "rows" in args:
        shape = "%dx%d" % (args["rows"], args["features"])
    else:
        index = next((v for k, v in args.items() if k.startswith("shape")), -1)
        shape = label or "shape %d" % index
        BN_ORDER.setdefault(shape, index)
    return lib, layer, direction, shape, args["threads"]


def load(path):
    """The rows of a benchmark JSON: {(layer, dir, shape, threads): {lib: row}}, context.
    With repetitions (reported as aggregates only), the median is used."""
    with open(path) as f:
        data = json.load(f)
    table = {}
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        key = parse_name(b.get("run_name", b["name"]), b.get("label", ""))
        if key is None:
            continue
        lib, layer, direction, shape, threads = key
        row = {"gbps": b.get("GB/s"), "of_memcpy": b.get("of_memcpy"), "memcpy": b.get("memcpy_GB/s"),
               "time_us": b.get("real_time", 0) * {"ns": 1e-3, "us": 1, "ms": 1e3, "s": 1e6}[b.get("time_unit", "ns")],
               "error": b.get("error_message") if b.get("error_occurred") else None}
        table.setdefault((layer, direction, shape, threads), {})[lib] = row
    return table, data.get("context", {})


def shape_rank(shape):
    """BatchNorm shapes in their listed order, row shapes by size."""
    if shape in BN_ORDER:
        return BN_ORDER[shape]
    size = 1
    for v in re.findall(r"\d+", shape):
        size *= int(v)
    return size


def sort_key(key):
    layer, direction, shape, threads = key
    return (LAYERS.index(layer) if layer in LAYERS else 99,
            DIRECTIONS.index(direction) if direction in DIRECTIONS else 99, shape_rank(shape), threads)


def peers_of(libs):
    return [p for p in PEER_ORDER if p in libs]


def best_peer(libs):
    """(name, GB/s) of the fastest peer that ran, or None."""
    ok = [(p, libs[p]["gbps"]) for p in peers_of(libs) if not libs[p]["error"] and libs[p]["gbps"]]
    return max(ok, key=lambda t: t[1]) if ok else None


def rows_by_layer(table):
    """{(layer, direction, shape): {threads: libs}} in table order."""
    out = {}
    for key in sorted((k for k in table if k[0] != "Memcpy"), key=sort_key):
        out.setdefault(key[:3], {})[key[3]] = table[key]
    return out


def cell(libs):
    nk = libs.get("normkit")
    if not nk or nk["error"] or not nk["gbps"]:
        return "%-30s" % ("(no normkit row)" if not nk else "error")
    text = "%6.1f %4.0f%%" % (nk["gbps"], 100 * nk["of_memcpy"])
    bp = best_peer(libs)
    if bp:
        r = nk["gbps"] / bp[1]
        text += "  %5.2fx %-10s%s" % (r, bp[0], "!" if r < 1 else " ")
    else:
        text += "  %-18s" % "(no peer)"
    return text


def summary(table, context):
    """The one-screen table."""
    threads = sorted({k[3] for k in table})
    lines = ["normkit vs peers: GB/s (minimum traffic), % of memcpy, normkit/best peer ('!' = behind)",
             "peers compiled in: %s; machine: %s CPUs" % (context.get("normkit_peers", "?"), context.get("num_cpus", "?")),
             ""]
    head = "%-10s %-13s %-17s" % ("layer", "direction", "shape")
    head += "".join(" | %-30s" % ("%d thread%s" % (t, "" if t == 1 else "s")) for t in threads)
    lines += [head, "-" * len(head)]
    for (layer, direction, shape), per_t in rows_by_layer(table).items():
        if not per_t or all("normkit" not in v and not peers_of(v) for v in per_t.values()):
            continue
        line = "%-10s %-13s %-17s" % (layer, direction, shape)
        line += "".join(" | " + cell(per_t.get(t, {})) for t in threads)
        lines.append(line)
    errors = sorted({"%s %s %s %s: %s" % (lib, k[0], k[1], k[2], r["error"])
                     for k, libs in table.items() for lib, r in libs.items() if r["error"]})
    if errors:
        lines += ["", "skipped (output check failed or error):"] + ["  " + e for e in errors[:8]]
        if len(errors) > 8:
            lines.append("  ... %d more" % (len(errors) - 8))
    lines += [""] + dyt_question(table, compact=True)
    return "\n".join(lines)


def dyt_question(table, compact=False):
    """The DyT paper's question: DyT time over LayerNorm time (and RMSNorm's), forward and
    backward, per shape and threads, for normkit and for each peer that has both."""
    libs = ["normkit", "torch", "oneDNN"]
    out = []
    if compact:
        out.append("DyT time / LayerNorm time (< 1: DyT is cheaper), same library:")
    else:
        out += ["| direction | shape | threads | " + " | ".join(
                    "%s DyT/LN | %s RMS/LN" % (l, l) for l in libs) + " |",
                "|---|---|---|" + "---|---|" * len(libs)]
    keys = sorted({(k[1], k[2], k[3]) for k in table if k[0] == "DyT" and k[1] in ("Forward", "Backward")},
                  key=lambda t: (DIRECTIONS.index(t[0]), shape_rank(t[1]), t[2]))
    for direction, shape, threads in keys:
        dyt = table.get(("DyT", direction, shape, threads), {})
        ln = table.get(("LayerNorm", direction, shape, threads), {})
        rms = table.get(("RMSNorm", direction, shape, threads), {})

        def ratio(a, b, lib):
            if lib in a and lib in b and not a[lib]["error"] and not b[lib]["error"] and b[lib]["time_us"]:
                return "%.2f" % (a[lib]["time_us"] / b[lib]["time_us"])
            return "-"
        if compact:
            out.append("  %-8s %-10s %dt: " % (direction, shape, threads) +
                       "  ".join("%s %s" % (l, ratio(dyt, ln, l)) for l in libs))
        else:
            out.append("| %s | %s | %d | " % (direction, shape, threads) +
                       " | ".join("%s | %s" % (ratio(dyt, ln, l), ratio(rms, ln, l)) for l in libs) + " |")
    return out


def markdown(table, context, meta):
    """docs/benchmarks.md: machine, build, the full table with every peer, the DyT table, charts."""
    threads = sorted({k[3] for k in table})
    md = ["# normkit benchmarks", "",
          "Generated by `python3 bench/compare.py %s` on %s. Do not edit by hand." % (meta["args"], meta["date"]), "",
          "- machine: %s, %s CPUs, caches: %s" % (meta["cpu"], context.get("num_cpus", "?"), meta["caches"]),
          "- compiler: %s; flags: `%s`" % (meta["compiler"], meta["flags"]),
          "- peers: %s; Google Benchmark %s" % (context.get("normkit_peers", "?"), meta["benchmark"]),
          "- threads measured: %s; load average at start: %s" % (
              ",".join(map(str, threads)), ", ".join("%.1f" % v for v in context.get("load_avg", []))),
          "- %s" % meta["note"], "",
          "GB/s counts the minimum traffic (forward 8 B/float: read x, write y; backward 12 B/float: read x "
          "and dy, write dx). `memcpy` is the fraction of a memcpy of the same floats with the same threads, "
          "measured right after each row. `vs X` is normkit GB/s / X GB/s: above 1, normkit is faster; "
          "**bold** marks rows where normkit is behind its best peer.", ""]
    peers = [p for p in PEER_ORDER if any(p in v for v in table.values())]
    md += ["| layer | direction | shape | threads | normkit GB/s | of memcpy | " +
           " | ".join("vs %s" % p for p in peers) + " | best peer |",
           "|---|---|---|---:|---:|---:|" + "---:|" * len(peers) + "---|"]
    for (layer, direction, shape), per_t in rows_by_layer(table).items():
        for t in threads:
            libs = per_t.get(t)
            if not libs or "normkit" not in libs or libs["normkit"]["error"]:
                continue
            nk = libs["normkit"]
            ratios = []
            for p in peers:
                r = libs.get(p)
                ratios.append("-" if not r else "skipped" if r["error"] else "%.2fx" % (nk["gbps"] / r["gbps"]))
            bp = best_peer(libs)
            behind = bp and nk["gbps"] < bp[1]
            best = "-" if not bp else ("**%s %.2fx**" if behind else "%s %.2fx") % (bp[0], nk["gbps"] / bp[1])
            md.append("| %s | %s | %s | %d | %.1f | %.0f%% | %s | %s |" % (
                layer, direction, shape, t, nk["gbps"], 100 * nk["of_memcpy"], " | ".join(ratios), best))
    md += ["", "## DyT versus normalization: time ratios", "",
           "DyT time / LayerNorm time and RMSNorm time / LayerNorm time, each within one library "
           "(below 1: cheaper than LayerNorm). oneDNN 2.6 has no RMSNorm and no DyT backward.", ""]
    md += dyt_question(table)
    md += ["", "## Charts", ""]
    for png in meta["pngs"]:
        md += ["![%s](img/%s)" % (os.path.splitext(png)[0], png), ""]
    return "\n".join(md) + "\n"


def machine_meta(binary, args_text):
    def sh(cmd):
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception:
            return ""
    cpu = sh("lscpu | sed -n 's/^Model name: *//p' | head -1") or platform.processor()
    caches = sh("lscpu | grep -E '^L[123]' | sed 's/  */ /g' | paste -sd ';'")
    cache_file = os.path.join(os.path.dirname(os.path.dirname(binary)), "CMakeCache.txt")
    cxx, flags, build = "c++", "", ""
    if os.path.exists(cache_file):
        for line in open(cache_file):
            if line.startswith("CMAKE_CXX_COMPILER:"):
                cxx = line.split("=", 1)[1].strip()
            elif line.startswith("CMAKE_BUILD_TYPE:"):
                build = line.split("=", 1)[1].strip()
        for line in open(cache_file):
            if build and line.startswith("CMAKE_CXX_FLAGS_%s:" % build.upper()):
                flags = line.split("=", 1)[1].strip()
            if line.startswith("NORMKIT_NATIVE:") and line.strip().endswith("ON"):
                flags += " -march=native"
    return {"cpu": cpu, "caches": caches or "?", "compiler": sh("%s --version | head -1" % cxx) or cxx,
            "flags": (flags + " (%s)" % build).strip(), "date": datetime.date.today().isoformat(),
            "benchmark": sh("dpkg-query -W -f '${Version}' libbenchmark-dev") or "?", "args": args_text}


# (repetitions, seconds per repetition) of each row.
QUICK = (3, 0.02)
FULL = (5, 0.2)


def run(binary, threads, quick, bench_filter, out):
    env = dict(os.environ, NORMKIT_BENCH_THREADS=threads)
    # Every row is timed several times, and the repetitions of all rows run in a random
    # order: normkit's row and its peers' are then sampled across the same minutes, and
    # their medians meet the same load on a shared machine. Timed one after the other, a
    # burst of load that fell on one of them alone moved a ratio by 2x between runs.
    reps, min_time = QUICK if quick else FULL
    cmd = [binary, "--benchmark_out=" + out, "--benchmark_out_format=json",
           "--benchmark_min_time=%s" % min_time, "--benchmark_format=console",
           "--benchmark_repetitions=%d" % reps, "--benchmark_enable_random_interleaving=true",
           "--benchmark_report_aggregates_only=true"]
    if bench_filter:
        cmd.append("--benchmark_filter=" + bench_filter)
    print("running:", "NORMKIT_BENCH_THREADS=%s" % threads, " ".join(cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    done = 0
    for line in proc.stdout:
        if line.startswith("BM_"):
            done += 1
            if sys.stderr.isatty():
                print("\r  %3d done: %-70s" % (done, line.split()[0][:70]), end="", file=sys.stderr, flush=True)
        elif line.startswith(("normkit_", "Load Average", "***WARNING")):
            print("  " + line.rstrip(), file=sys.stderr)
    if sys.stderr.isatty():
        print(file=sys.stderr)
    if proc.wait() != 0:
        sys.exit("normkit_bench failed with exit code %d" % proc.returncode)


def plots(json_path, table, folder):
    """The charts of bench/plot.py; through Debian's /usr/bin/python3 when this Python
    (a virtualenv, pyenv) has no matplotlib."""
    try:
        import plot  # bench/plot.py, next to this script
    except ImportError:
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plot.py")
        res = subprocess.run(["/usr/bin/python3", script, json_path, folder], capture_output=True, text=True)
        if res.returncode != 0:
            print("no charts: matplotlib is missing (apt-get install python3-matplotlib)\n" + res.stderr,
                  file=sys.stderr)
            return []
        return [os.path.basename(line) for line in res.stdout.split()]
    return plot.write_all(table, folder)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.environ.get("NORMKIT_BENCH", DEFAULT_BIN),
                    help="the benchmark binary (default build/release/bench/normkit_bench)")
    ap.add_argument("--quick", action="store_true",
                    help="short timings, median of 3 interleaved repetitions: < 5 minutes on 2 cores")
    ap.add_argument("--threads", default="1,2", help="thread counts, e.g. 1,2,all (default 1,2)")
    ap.add_argument("--filter", default="", help="a --benchmark_filter regex (keep BM_Memcpy out of it: it is not needed)")
    ap.add_argument("--json", help="summarize this JSON instead of running the binary")
    ap.add_argument("--out", help="where to keep the run's JSON (default: a temporary file)")
    ap.add_argument("--markdown", help="also write the full table as markdown (e.g. docs/benchmarks.md)")
    ap.add_argument("--plots", help="also write the PNG charts into this folder (e.g. docs/img)")
    ap.add_argument("--note", default="measured on a machine shared with other jobs: expect noise of 10-30%; "
                    "the memcpy fraction of each row is measured moments after it, so it is steadier than GB/s",
                    help="a line for the markdown header")
    a = ap.parse_args()
    path = a.json
    if not path:
        if not os.path.exists(a.bin):
            sys.exit("no benchmark binary at %s: build it first (cmake --preset release && "
                     "cmake --build --preset release) or pass --bin" % a.bin)
        path = a.out or os.path.join(tempfile.gettempdir(), "normkit_bench_%d.json" % os.getpid())
        run(a.bin, a.threads, a.quick, a.filter, path)
        print("JSON: %s" % path, file=sys.stderr)
    table, context = load(path)
    print(summary(table, context))
    pngs = []
    if a.plots:
        pngs = plots(path, table, a.plots)
    if a.markdown:
        args_text = " ".join(x for x in sys.argv[1:]
                             if x not in (a.json, a.bin) and x not in ("--json", "--bin")
                             and not x.startswith(("--json=", "--bin=")))
        meta = machine_meta(os.path.abspath(a.bin), args_text)
        meta["note"] = a.note
        meta["pngs"] = pngs
        with open(a.markdown, "w") as f:
            f.write(markdown(table, context, meta))
        print("wrote %s" % a.markdown, file=sys.stderr)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()

"""Plots of benchmarks.run's CSV files: fwd+bwd time and workspace against the number of
target columns (M*L, log scales), one line per implementation, dtype and N.

    python -m benchmarks.plot benchmarks/results/results_NVIDIA_H100_80GB_HBM3_bf16_cuda.csv --out plot.png
"""
from __future__ import annotations

import argparse
import csv
import os
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from . import arguments  # noqa: E402


def main(argv=None):
    ap = arguments.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv", nargs="+")
    ap.add_argument("--out", required=True, help="PNG file")
    args = ap.parse_args(argv)
    for path in args.csv:
        if not os.path.isfile(path):
            ap.error(f"csv {path}: no such file")
    arguments.check_folder(ap, "--out's folder", os.path.dirname(os.path.abspath(args.out)))
    series = defaultdict(list)
    device = ""
    for path in args.csv:
        with open(path) as f:
            for row in csv.DictReader(f):
                device = row["device"]
                if row["status"] != "ok" or not row["fwd_bwd_ms"]:
                    continue
                key = f"{row['impl']} ({row['dtype']}, N={row['n']})"
                cols = int(row["m"]) * int(row["l"])
                series[key].append((cols, int(row["n"]), float(row["fwd_bwd_ms"]), float(row["workspace_mib"])))
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, pts in sorted(series.items()):
        pts.sort()
        x = [p[0] for p in pts]
        ax_t.plot(x, [p[2] for p in pts], marker="o", label=key)
        ax_m.plot(x, [max(p[3], 0.01) for p in pts], marker="o", label=key)
    for ax, title, unit in ((ax_t, "forward+backward time", "ms"), (ax_m, "workspace (peak - gradients)", "MiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("target columns M*L (negatives per source ~ M*L)")
        ax.set_ylabel(unit)
        ax.set_title(f"{title}, {device}")
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

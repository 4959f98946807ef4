"""Usage: python3 benchmarks/ncu_stalls.py SASS.csv[.gz] --json stalls.json [--top 20]

Reads Nsight Compute's per-instruction page of a report (`ncu --import R.ncu-rep --page source --print-source sass
--csv`, one table a profiled kernel, in launch order) and writes, for each kernel, where its warps were sampled
waiting: the samples a stall reason over the whole kernel, and the instructions with the most samples, each with its
reasons. benchmarks/probe_matvec_ncu.py names the kernels' order. No GPU needed.
"""
import argparse
import csv
import gzip
import io
import json
import sys

REASONS = ["long_sb", "short_sb", "wait", "barrier", "mio", "not_selected", "selected", "math", "dispatch", "lg",
           "branch_resolving", "no_inst", "imc", "drain", "membar", "misc", "sleep", "tex"]


def tables(text):
    """The CSV's tables: [(header, rows)], one a kernel."""
    out = []
    for row in csv.reader(io.StringIO(text)):
        if row and row[0] == "Kernel Name":
            out.append([None, []])
        elif row and row[0] == "Address" and out:
            out[-1][0] = row
        elif out and out[-1][0] and len(row) == len(out[-1][0]):
            out[-1][1].append(row)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("csv")
    parser.add_argument("--json", required=True)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    opener = gzip.open if args.csv.endswith(".gz") else open
    with opener(args.csv, "rt") as f:
        found = tables(f.read())
    kernels = []
    for header, rows in found:
        col = {name: i for i, name in enumerate(header)}
        samples = col["Warp Stall Sampling (All Samples)"]
        reasons = [r for r in REASONS if "stall_" + r in col]

        def count(row, name):
            return int(row[col[name]] or 0)
        total = sum(count(row, header[samples]) for row in rows)
        by_reason = {r: sum(count(row, "stall_" + r) for row in rows) for r in reasons}
        top = sorted(range(len(rows)), key=lambda i: -count(rows[i], header[samples]))[:args.top]
        kernels.append(dict(
            samples=total, instructions=len(rows),
            share_by_reason={r: round(n / max(total, 1), 3) for r, n in sorted(by_reason.items(), key=lambda x: -x[1])
                             if n},
            top=[dict(line=i, sass=rows[i][col["Source"]].strip(), samples=count(rows[i], header[samples]),
                      reasons={r: count(rows[i], "stall_" + r) for r in reasons if count(rows[i], "stall_" + r)})
                 for i in top]))
    json.dump(dict(source=args.csv, kernels=kernels), open(args.json, "w"), indent=1)
    for k, kernel in enumerate(kernels):
        print(f"kernel {k}: {kernel['samples']} samples; " + ", ".join(f"{r} {s:.0%}" for r, s in
                                                                     list(kernel["share_by_reason"].items())[:6]))
    return 0 if kernels else 1


if __name__ == "__main__":
    sys.exit(main())

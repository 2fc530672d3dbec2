"""Where a kernel's warps stall, from Nsight Compute's source-level sampling: the stall reasons of the
main loop against the rest of the kernel, the loop's instruction mix, and its instructions with the
most samples. This is where docs/BENCHMARKS.md's "where the Hopper kernel's time goes" comes from.

    ncu -k regex:KERNEL -s 2 -c 1 --section WarpStateStats --section SourceCounters -o rep python3 run.py
    ncu -i rep.ncu-rep --page source --csv --print-source sass > kernel.csv
    python3 tools/stall_report.py kernel.csv [--top 12]

Build with -lineinfo for source lines in Nsight's own views (not needed here). The main loop is taken
to be the instructions executed most often by the same count (once per tile of a tiled kernel), so a
retry loop that spins a varying number of times is not mistaken for it.
"""
import argparse
import collections
import csv
import sys

from sass_loop import opcode  # tools/ is on the path when this script runs


def read(path):
    """The kernel's name and its rows (a dict per instruction) from an `ncu --page source --csv` file."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2 or not rows[0] or rows[0][0] != "Kernel Name":
        sys.exit(f"{path}: not an `ncu --page source --csv` listing (its first line names the kernel)")
    header = rows[1]
    return rows[0][1], [dict(zip(header, r)) for r in rows[2:] if len(r) == len(header)]


def number(text):
    try:
        return float(text)
    except ValueError:  # "-" for instructions without a value
        return 0.0


def stall_reasons(rows):
    """{reason: samples} over rows, from the stall_* columns (all samples, issued or not)."""
    totals = collections.Counter()
    for row in rows:
        for column, value in row.items():
            if column.startswith("stall_") and "Not Issued" not in column:
                totals[column[len("stall_"):]] += number(value)
    return totals


def shares(counter):
    total = sum(counter.values()) or 1.0
    return ", ".join(f"{name} {100 * value / total:.0f}%" for name, value in counter.most_common() if value / total >= 0.02)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=12, help="loop instructions to list by samples")
    args = ap.parse_args(argv)
    kernel, rows = read(args.csv)
    executed = collections.Counter(int(number(r["Instructions Executed"])) for r in rows)
    executed.pop(0, None)
    if not executed:
        sys.exit(f"{args.csv}: no instruction was executed")
    per_trip = executed.most_common(1)[0][0]
    loop = [r for r in rows if int(number(r["Instructions Executed"])) == per_trip]
    rest = [r for r in rows if int(number(r["Instructions Executed"])) != per_trip]
    samples = sum(number(r["Warp Stall Sampling (All Samples)"]) for r in rows) or 1.0
    loop_samples = sum(number(r["Warp Stall Sampling (All Samples)"]) for r in loop)
    print(kernel)
    print(f"main loop: {len(loop)} instructions executed {per_trip} times each, {100 * loop_samples / samples:.1f}% of the samples")
    print(f"  stalls in the loop: {shares(stall_reasons(loop))}")
    print(f"  stalls elsewhere:   {shares(stall_reasons(rest))}")
    mix = collections.Counter(opcode(r["Source"].strip()) for r in loop)
    print("  loop instruction mix: " + ", ".join(f"{name} {count}" for name, count in mix.most_common()))
    print("  loop instructions with the most samples:")
    for r in sorted(loop, key=lambda r: -number(r["Warp Stall Sampling (All Samples)"]))[: args.top]:
        reasons = stall_reasons([r]).most_common(2)
        why = ", ".join(f"{name} {int(value)}" for name, value in reasons if value)
        print(f"  {100 * number(r['Warp Stall Sampling (All Samples)']) / samples:5.1f}%  {r['Source'].strip()[:60]:60s}  {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

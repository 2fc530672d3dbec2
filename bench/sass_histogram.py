"""Opcode histogram of one kernel's SASS, for reading where a kernel's instructions go.

    cuobjdump -sass build/libturboattn.so | python3 bench/sass_histogram.py flashq_prefill_kernelILi128E6__half
"""
import collections
import re
import sys


def main():
    pattern = sys.argv[1]
    counts, inside, name = collections.Counter(), False, None
    for line in sys.stdin:
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            inside = pattern in m.group(1)
            name = m.group(1) if inside else name
            continue
        if inside:
            op = re.match(r"\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", line)
            if op:
                counts[op.group(1).split(".")[0]] += 1
    print(f"{name}: {sum(counts.values())} instructions (static)")
    for op, n in counts.most_common(40):
        print(f"  {op:12s} {n}")


if __name__ == "__main__":
    main()

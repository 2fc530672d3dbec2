"""Instruction mix of a kernel's main loop, read from its SASS: how many instructions one trip costs and
of which kinds. This is where docs/BENCHMARKS.md's per-tile counts come from (a branch region per score
and per-copy address arithmetic showed up here, not in the source).

    python3 tools/sass_loop.py CUBIN KERNEL_SUBSTRING [--cuobjdump PATH] [--list]

CUBIN: one translation unit compiled with `-cubin -arch=sm_90a` instead of `-c` (take the command from
`ninja -t commands <object>`). cuobjdump comes with the CUDA toolkit or, without one, from PyPI:
`pip download --no-deps nvidia-cuda-cuobjdump` and unzip (nvidia/cu13/bin/cuobjdump). The main loop is
taken to be the longest backward branch of the first function whose mangled name contains
KERNEL_SUBSTRING; --list prints the functions instead.
"""
import argparse
import collections
import re
import subprocess
import sys

INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]+)\*/\s+(.*?);")
BRANCH_TARGET = re.compile(r"\bBRA\b.*?0x([0-9a-f]+)")


def functions(cuobjdump, cubin):
    """{mangled name: its SASS lines}, in the cubin's order."""
    listing = subprocess.run([cuobjdump, "-sass", cubin], check=True, capture_output=True, text=True).stdout
    result, lines = {}, None
    for line in listing.splitlines():
        header = re.search(r"Function : (\S+)", line)
        if header:
            lines = result.setdefault(header.group(1), [])
        elif lines is not None:
            lines.append(line)
    return result


def opcode(text):
    """'@!P0 BRA 0x30' -> 'BRA'; 'IMAD.MOV.U32 R1, ...' -> 'IMAD'."""
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cubin")
    ap.add_argument("kernel", nargs="?", default="")
    ap.add_argument("--cuobjdump", default="cuobjdump")
    ap.add_argument("--list", action="store_true", help="print the functions in the cubin")
    ap.add_argument("--top", type=int, default=25, help="opcodes to print")
    args = ap.parse_args(argv)
    sass = functions(args.cuobjdump, args.cubin)
    if args.list:
        print("\n".join(sass))
        return 0
    matches = [f for f in sass if args.kernel in f]
    if not matches:
        sys.exit(f"no function in {args.cubin} contains {args.kernel!r} (--list shows them)")
    code = [(int(m.group(1), 16), m.group(2).strip()) for m in map(INSTRUCTION.match, sass[matches[0]]) if m]
    loops = []
    for address, text in code:
        target = BRANCH_TARGET.search(text)
        if target and int(target.group(1), 16) < address:
            loops.append((address - int(target.group(1), 16), int(target.group(1), 16), address))
    print(f"{matches[0]}: {len(code)} instructions")
    if not loops:
        print("no backward branch: no loop")
        return 0
    _, first, last = max(loops)
    body = [text for address, text in code if first <= address <= last]
    counts = collections.Counter(opcode(text) for text in body)
    print(f"longest loop: {len(body)} instructions ({first:#x}-{last:#x}), {counts['BSSY']} branch regions")
    for name, count in counts.most_common(args.top):
        print(f"{count:6d} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

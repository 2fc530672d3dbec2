#!/usr/bin/env python3
"""Splits a file into chunks small enough to carry to the GPU machine (at most 64 MiB per call) and joins
them there, checking the SHA-256 of the whole.

    tools/chunks.py split FILE DIR [--mib 48]   -> DIR/NAME.partNN and DIR/NAME.sha256
    tools/chunks.py join DIR NAME OUT           -> OUT, verified (exit 1 on a missing part or a bad hash)
"""
import argparse
import hashlib
import os
import sys


def split(path, directory, mib):
    os.makedirs(directory, exist_ok=True)
    name, h, n = os.path.basename(path), hashlib.sha256(), 0
    with open(path, "rb") as f:
        while True:
            data = f.read(mib << 20)
            if not data:
                break
            h.update(data)
            with open(os.path.join(directory, f"{name}.part{n:02d}"), "wb") as out:
                out.write(data)
            n += 1
    with open(os.path.join(directory, f"{name}.sha256"), "w") as f:
        f.write(f"{h.hexdigest()} {n}\n")
    print(f"{path}: {n} parts of at most {mib} MiB in {directory}")


def join(directory, name, out):
    digest, n = open(os.path.join(directory, f"{name}.sha256")).read().split()
    parts = [os.path.join(directory, f"{name}.part{i:02d}") for i in range(int(n))]
    for part in parts:
        if not os.path.exists(part):
            sys.exit(f"join: {part} is missing ({n} parts expected)")
    h = hashlib.sha256()
    with open(out + ".tmp", "wb") as f:
        for part in parts:
            data = open(part, "rb").read()
            h.update(data)
            f.write(data)
    if h.hexdigest() != digest:
        os.remove(out + ".tmp")
        sys.exit(f"join: SHA-256 of the joined {name} does not match")
    os.replace(out + ".tmp", out)
    print(f"{out}: {n} parts joined, SHA-256 verified")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("split")
    p.add_argument("file")
    p.add_argument("dir")
    p.add_argument("--mib", type=int, default=48)
    p = sub.add_parser("join")
    p.add_argument("dir")
    p.add_argument("name")
    p.add_argument("out")
    a = ap.parse_args()
    split(a.file, a.dir, a.mib) if a.cmd == "split" else join(a.dir, a.name, a.out)


if __name__ == "__main__":
    main()

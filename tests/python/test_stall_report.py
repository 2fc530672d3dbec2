"""tools/stall_report.py on a canned `ncu --page source --csv` listing, so that the stall shares quoted in
docs/BENCHMARKS.md come from a tested reader."""
import csv
import os
import subprocess
import sys

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "stall_report.py")

HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Warp Stall Sampling (Not-issued Samples)",
          "Instructions Executed", "stall_long_sb", "stall_math", "stall_selected", "stall_wait",
          "stall_math (Not Issued)"]
ROWS = [  # a prologue, a three-instruction loop run 100 times, and a retry loop that spun 250 times
    ["0x00", "      LDC R1, c[0x0][0x28]", "4", "4", "1", "4", "0", "0", "0", "0"],
    ["0x10", "      I2FP.F32.S32 R2, R3", "30", "20", "100", "0", "20", "10", "0", "20"],
    ["0x20", "      FFMA R2, R2, R4, R5", "10", "5", "100", "0", "0", "5", "5", "0"],
    ["0x30", "@!P0  BRA 0x10", "6", "6", "100", "0", "0", "0", "6", "0"],
    ["0x40", "      SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [R1], R2", "50", "50", "250", "50", "0", "0", "0", "0"],
]


def listing(tmp_path, first_line=("Kernel Name", "void k(int)")):
    path = tmp_path / "k.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(first_line)
        w.writerow(HEADER)
        w.writerows(ROWS)
    return str(path)


def run(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True)


def test_loop_stalls_mix_and_top_instructions(tmp_path):
    out = run(listing(tmp_path), "--top", "2")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "void k(int)"
    assert lines[1] == "main loop: 3 instructions executed 100 times each, 46.0% of the samples"
    # Loop samples by reason: math 20, selected 15, wait 11 (46); "(Not Issued)" columns not added again.
    assert lines[2] == "  stalls in the loop: math 43%, selected 33%, wait 24%"
    assert lines[3] == "  stalls elsewhere:   long_sb 100%"
    assert lines[4] == "  loop instruction mix: I2FP 1, FFMA 1, BRA 1"
    assert lines[6].split()[:2] == ["30.0%", "I2FP.F32.S32"] and lines[6].endswith("math 20, selected 10")
    assert lines[7].split()[:2] == ["10.0%", "FFMA"]
    assert len(lines) == 8


def test_rejects_other_files(tmp_path):
    out = run(listing(tmp_path, first_line=("Address", "Source")))
    assert out.returncode != 0 and "not an `ncu --page source --csv` listing" in out.stderr

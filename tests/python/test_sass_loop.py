"""tools/sass_loop.py on a canned cuobjdump listing (a stand-in script), so that the SASS counts quoted in
docs/BENCHMARKS.md come from a tested reader."""
import os
import stat
import subprocess
import sys

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "sass_loop.py")

LISTING = """
	code for sm_90a
		Function : _Z6kernelv
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/                   ISETP.GE.AND P0, PT, R0, 0x4, PT ;
        /*0020*/                   BSSY B0, 0x60 ;
        /*0030*/                   I2FP.F32.S32 R2, R3 ;
        /*0040*/                   FMUL R2, R2, R4 ;
        /*0050*/               @P0 BRA 0x30 ;
        /*0060*/                   BSYNC B0 ;
        /*0070*/              @!P1 BRA 0x10 ;
        /*0080*/                   EXIT ;
		Function : _Z5otherv
        /*0000*/                   EXIT ;
"""


def fake_cuobjdump(tmp_path):
    listing = tmp_path / "listing.txt"
    listing.write_text(LISTING)
    script = tmp_path / "cuobjdump"
    script.write_text(f"#!/bin/sh\ncat {listing}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def run(tmp_path, *args):
    return subprocess.run([sys.executable, TOOL, "x.cubin", *args, "--cuobjdump", fake_cuobjdump(tmp_path)],
                          capture_output=True, text=True)


def test_longest_loop_and_its_opcodes(tmp_path):
    out = run(tmp_path, "kernel")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "_Z6kernelv: 9 instructions"
    assert lines[1] == "longest loop: 7 instructions (0x10-0x70), 1 branch regions"
    counts = {line.split()[1]: int(line.split()[0]) for line in lines[2:]}
    assert counts == {"BRA": 2, "ISETP": 1, "BSSY": 1, "I2FP": 1, "FMUL": 1, "BSYNC": 1}


def test_list_and_unknown_kernel(tmp_path):
    assert run(tmp_path, "--list").stdout.split() == ["_Z6kernelv", "_Z5otherv"]
    missing = run(tmp_path, "nosuch")
    assert missing.returncode != 0 and "no function in x.cubin contains 'nosuch'" in missing.stderr

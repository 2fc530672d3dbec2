"""tools/chunks.py: weights split into pieces small enough for one call to the GPU machine, joined there
with the whole file's SHA-256 checked."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(REPO, "tools", "chunks.py")


def run(*args):
    return subprocess.run([sys.executable, TOOL, *map(str, args)], capture_output=True, text=True)


def test_split_then_join_gives_the_same_bytes(tmp_path):
    data = os.urandom((5 << 20) // 2 + 123)  # 2.5 MiB and a bit: three parts of at most 1 MiB
    src = tmp_path / "model.gguf"
    src.write_bytes(data)
    parts = tmp_path / "parts"
    r = run("split", src, parts, "--mib", 1)
    assert r.returncode == 0, r.stderr
    names = sorted(os.listdir(parts))
    assert names == ["model.gguf.part00", "model.gguf.part01", "model.gguf.part02", "model.gguf.sha256"]
    assert all((parts / n).stat().st_size <= 1 << 20 for n in names[:3])
    out = tmp_path / "joined.gguf"
    r = run("join", parts, "model.gguf", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == data

    broken = bytearray((parts / "model.gguf.part01").read_bytes())
    broken[7] ^= 1
    (parts / "model.gguf.part01").write_bytes(bytes(broken))
    r = run("join", parts, "model.gguf", tmp_path / "bad.gguf")
    assert r.returncode == 1 and "does not match" in r.stderr and not (tmp_path / "bad.gguf").exists()
    os.remove(parts / "model.gguf.part02")
    r = run("join", parts, "model.gguf", tmp_path / "bad.gguf")
    assert r.returncode == 1 and "part02 is missing (3 parts expected)" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["joined.gguf", "model.gguf", "parts"]  # nothing half-written

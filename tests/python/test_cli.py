"""The command line: `python3 -m turboattn` (turboattn/cli.py) and the C++ program's hand-over of the
Python subcommands (tools/cli/main.cpp). CPU only: the decode benchmark runs its CPU smoke mode, and
calibrate runs a tiny randomly initialised Llama saved to a temporary directory (no downloads)."""
import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest

import turboattn
from turboattn import cli
from turboattn._progress import Progress

PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(turboattn.__file__)))
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def env_with_package(**extra):
    """The environment of a child process that imports this same package (TURBOATTN_LIB is inherited)."""
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=PACKAGE_PARENT + (os.pathsep + path if path else ""), **extra)


def test_version_names_the_library_and_cuda(capsys):
    assert cli.main(["version"]) == 0
    lines = capsys.readouterr().out.splitlines()
    cuda = "available" if turboattn.cuda_available() else "not available"
    assert lines[0] == f"turboattn {turboattn.version()}, CUDA kernels {cuda}"  # the C++ program's line
    assert "Python package" in lines[1] and lines[2].startswith("  library ")


def test_python_dash_m_runs_the_command_line():
    run = subprocess.run([sys.executable, "-m", "turboattn", "version"], capture_output=True, text=True,
                         env=env_with_package())
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(f"turboattn {turboattn.version()}, CUDA kernels ")
    run = subprocess.run([sys.executable, "-m", "turboattn", "frobnicate"], capture_output=True, text=True,
                         env=env_with_package())
    assert run.returncode == 2 and "invalid choice: 'frobnicate'" in run.stderr


def parse_rows(text):
    """{row name: [numbers]} of the reference report's table rows."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"^  (\S.*?)\s{2,}(-?[\d.]+|nan)\s+(-?[\d.]+|nan)(.*)$", line)
        if m:
            rows[m.group(1).strip()] = [float(m.group(2)), float(m.group(3))] + re.findall(r"[\d.]+", m.group(4))
    return rows


def test_reference_reports_errors_against_float64_and_memory(capsys):
    pytest.importorskip("numpy")
    assert cli.main(["reference", "--seqlen", "200", "--head-dim", "64", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "200 tokens, 8 query heads over 2 KV heads, head dim 64" in out
    rows = parse_rows(out)
    default, no_smooth = rows["FlashQ INT8 + SAS (default)"], rows["FlashQ INT8 + SAS, no K smoothing"]
    assert math.isfinite(default[0]) and 0 < default[0] < 0.15 and default[1] > 0.99
    # The K offsets of the sample are what smoothing removes: without it the error grows.
    assert no_smooth[0] > default[0]
    # The float64 attention the report computes agrees with the library's exact attention to fp16 rounding.
    assert rows["float64 rounded to fp16 (floor)"][0] < 1e-3
    # vs fp16 at head dim 64 with 2 KV heads, where the page header's 128 bytes weigh most (FORMATS.md 3.5)
    assert rows["8 bits"][0] < 0.3 and rows["8 bits"][-1] == "1.98"
    assert rows["2 bits"][-1] == "5.95"
    bytes_8, bytes_2 = float(rows["8 bits"][2]), float(rows["2 bits"][2])
    assert bytes_8 > bytes_2 > 0


def test_progress_without_tqdm_prints_one_line_per_step(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now fails
    with Progress(2, "rows") as bar:
        bar.write("result one")
        bar.update("first")
        bar.update()
    out, err = capsys.readouterr()
    assert out == "result one\n"
    lines = err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("rows: 1/2 first (") and lines[1].startswith("rows: 2/2 (")


def test_progress_with_tqdm_keeps_results_on_stdout(capsys):
    pytest.importorskip("tqdm")
    with Progress(3, "rows") as bar:
        for i in range(3):
            bar.write(f"result {i}")
            bar.update(f"step {i}")
    out, err = capsys.readouterr()
    assert out == "result 0\nresult 1\nresult 2\n"
    assert "3/3" in err


def test_bench_decode_cpu_smoke_run_writes_json_and_plot(tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch")
    monkeypatch.setitem(sys.modules, "tqdm", None)  # the plain progress, whose lines can be counted
    out = tmp_path / "res" / "decode.json"
    assert cli.main(["bench", "decode", "--device", "cpu", "--out", str(out)]) == 0
    stdout, stderr = capsys.readouterr()
    data = json.loads(out.read_text())
    assert set(data) == {"card", "commit", "date", "l2_flush", "rows", "cache", "copy_bandwidth", "host_overhead_us"}
    assert data["l2_flush"] == "read" and data["copy_bandwidth"]["gbps"] > 0 and data["copy_bandwidth"]["read_gbps"] > 0
    assert data["card"] == "cpu (smoke test)"
    rows = data["rows"]
    assert [(r["batch"], r["context"], str(r["bits"])) for r in rows] == [
        (b, n, bits) for b, n in ((1, 130), (2, 64)) for bits in ("8", "4", "2", "4/2")]
    for r in rows:
        assert "error" not in r, r.get("error")
        assert r["ms"]["turboattn"] > 0 and r["timing"] == "plain"
        assert {"fp16_ms", "fp16_how", "bytes_read", "fp16_bytes", "speedup", "rel_l2", "write_ms"} <= set(r)
    assert all(r["rel_l2"] < 0.05 for r in rows if r["bits"] == 8)
    assert set(data["cache"]["configs"]) == {"8", "4", "2", "4/2"}
    assert data["cache"]["bytes_per_token"]["4/2"]["bytes_per_token"] == 866.0  # FORMATS.md 3.7: 55,424 / 64
    assert "kvcache_decode" in data["host_overhead_us"]
    assert len([line for line in stdout.splitlines() if line.startswith("B")]) == len(rows)
    progress = [line for line in stderr.splitlines() if line.startswith("decode rows: ")]
    assert [p.split()[2] for p in progress] == [f"{i}/8" for i in range(1, 9)]
    if importlib.util.find_spec("matplotlib"):  # the plot is skipped (with a note) without it
        assert (tmp_path / "res" / "decode.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_prefill_imports_parses_and_plots(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "prefill", "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("usage: turboattn bench prefill [-h] [--out OUT] [--quick]")
    # The run itself needs CUDA; its plot does not.
    pytest.importorskip("matplotlib")
    from turboattn.benchmarks import prefill
    rows = [{"head_dim": 64, "seqlen": 4096, "causal": c, "tflops": {"turboattn": 100.0, "cudnn": 300.0, "fa2": 200.0,
                                                                     "sageattention": None}} for c in (False, True)]
    prefill.plot({"rows": rows, "card": "test", "commit": "x", "date": "today"}, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_prefill_times_another_kernel_and_restores_the_switch(monkeypatch):
    pytest.importorskip("torch")
    pytest.importorskip("triton")
    from turboattn.benchmarks import prefill
    seen = []
    for before in (None, "sm80"):
        if before is None:
            monkeypatch.delenv("TURBOATTN_PREFILL_MMA", raising=False)
        else:
            monkeypatch.setenv("TURBOATTN_PREFILL_MMA", before)
        assert prefill.with_path("sm90", lambda: seen.append(os.environ["TURBOATTN_PREFILL_MMA"]) or 1.5) == 1.5
        assert os.environ.get("TURBOATTN_PREFILL_MMA") == before

        def unsupported():
            raise turboattn.Unsupported(2, "TURBOATTN_PREFILL_MMA=sm90: this build has no sm_90a code")
        assert prefill.with_path("sm90", unsupported) is None  # a library or device without the path: no column
        assert os.environ.get("TURBOATTN_PREFILL_MMA") == before
    assert seen == ["sm90", "sm90"]


def save_tiny_llama(path):
    """A 2-layer Llama (4 query heads over 2 KV heads, head dim 64) and a word-level tokenizer, saved
    with save_pretrained as a model directory would be."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    words = "the of and a to in is was for on that with by as at from science history kitchen".split()
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)},
                                                           unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                      vocab_size=len(words) + 1, max_position_embeddings=512)
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return words


def test_calibrate_writes_head_bits_for_a_local_model(tmp_path, capsys):
    model_dir = tmp_path / "model"
    words = save_tiny_llama(model_dir)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(words * 10))  # 190 tokens
    out = tmp_path / "calib" / "bits.json"
    argv = ["calibrate", str(model_dir), "--text", str(text), "--tokens", "50", "--fraction", "0.5", "--out", str(out)]
    assert cli.main(argv) == 0
    stdout, stderr = capsys.readouterr()
    data = json.loads(out.read_text())
    assert (data["num_layers"], data["num_kv_heads"], data["fraction_2bit"], data["tokens"]) == (2, 2, 0.5, 50)
    assert data["metric"] == "sensitivity" and sorted(data["head_bits"]) == [2, 2, 4, 4]
    assert stdout.startswith(f"wrote {out}: 2 layers x 2 KV heads, 2 of 4 heads at 2 bits")
    assert "2/2" in stderr and "4/4" in stderr  # the progress over the layers, then over the heads, finished
    # The same as hf.calibrate on the first 50 tokens of the same model: the command line adds no change.
    import transformers
    import turboattn.hf as hf
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True)
    ids = transformers.AutoTokenizer.from_pretrained(str(model_dir))(text.read_text(), return_tensors="pt")["input_ids"]
    direct = hf.calibrate(model, ids[:, :50], 0.5, str(tmp_path / "direct.json"))
    assert direct["head_bits"] == data["head_bits"] and direct["priority"] == data["priority"]
    # --metric gap_std: the paper's statistic, one 2-bit head per layer.
    assert cli.main(argv + ["--metric", "gap_std"]) == 0
    data = json.loads(out.read_text())
    assert data["metric"] == "gap_std"
    assert [sorted(data["head_bits"][i * 2:i * 2 + 2]) for i in range(2)] == [[2, 4], [2, 4]]


def test_calibrate_reports_a_directory_that_is_no_model(tmp_path, capsys):
    pytest.importorskip("transformers")
    text = tmp_path / "t.txt"
    text.write_text("the of and")
    argv = ["calibrate", str(tmp_path), "--text", str(text), "--fraction", "0.5", "--out", str(tmp_path / "b.json")]
    assert cli.main(argv) == 2
    assert f"cannot load a causal LM and its tokenizer from {tmp_path}" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


@pytest.mark.parametrize("argv, message", [
    ([], "required: command"),
    (["frobnicate"], "invalid choice"),
    (["reference", "--seqlen", "0"], "--seqlen: 0: expected an integer >= 1"),
    (["reference", "--seqlen", "many"], "'many' is not an integer"),
    (["reference", "--head-dim", "80"], "--head-dim: invalid choice: 80"),
    (["bench"], "name a benchmark: prefill, decode, serve or tp"),
    (["bench", "train"], "invalid choice: 'train'"),
    (["calibrate", "{dir}", "--text", "{file}", "--fraction", "1.5", "--out", "x.json"], "1.5: expected a fraction"),
    (["calibrate", "{dir}", "--text", "{file}", "--fraction", "nan", "--out", "x.json"], "expected a fraction"),
    (["calibrate", "{dir}/missing", "--text", "{file}", "--fraction", "0.5", "--out", "x.json"], "is not a directory"),
    (["calibrate", "{dir}", "--text", "{dir}/missing.txt", "--fraction", "0.5", "--out", "x.json"], "is not a file"),
    (["calibrate", "{dir}", "--text", "{file}", "--fraction", "0.5"], "required: --out"),
    (["calibrate", "{dir}", "--text", "{file}", "--tokens", "0", "--fraction", "0.5", "--out", "x"], "--tokens: 0"),
])
def test_bad_arguments_exit_2_with_a_message(argv, message, tmp_path, capsys):
    (tmp_path / "t.txt").write_text("text")
    argv = [a.format(dir=tmp_path, file=tmp_path / "t.txt") for a in argv]
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bench_passes_its_arguments_through(capsys):
    pytest.importorskip("torch")
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "decode", "--device", "tpu"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: turboattn bench decode") and "--device: invalid choice: 'tpu'" in err


# ---- the C++ program (tools/cli): `turboattn bench|calibrate` run `python3 -m turboattn` ----

def cpp_cli():
    path = os.environ.get("TURBOATTN_CLI") or os.path.join(REPO, "build", "turboattn")
    if not os.path.isfile(path):
        pytest.skip("the C++ turboattn program is not built (build/turboattn, or set TURBOATTN_CLI)")
    return path


def python3_dir(tmp_path, script=None):
    """A directory holding `python3`: this interpreter, or a script (the C++ program finds it on PATH)."""
    d = tmp_path / "bin"
    d.mkdir()
    if script is None:
        os.symlink(sys.executable, d / "python3")
    else:
        (d / "python3").write_text(script)
        (d / "python3").chmod(0o755)
    return str(d)


def test_cpp_program_hands_bench_and_calibrate_to_python(tmp_path):
    exe = cpp_cli()
    env = env_with_package(PATH=python3_dir(tmp_path) + os.pathsep + os.environ.get("PATH", ""))
    run = subprocess.run([exe, "bench"], capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "name a benchmark: prefill, decode, serve or tp" in run.stderr  # Python's parser said it
    run = subprocess.run([exe, "calibrate", "--help"], capture_output=True, text=True, env=env)
    assert run.returncode == 0 and run.stdout.startswith("usage: turboattn calibrate")
    run = subprocess.run([exe, "version"], capture_output=True, text=True, env=env)  # still the C++ one
    assert run.returncode == 0 and run.stdout.count("\n") == 1


def test_cpp_program_names_what_to_install(tmp_path):
    exe = cpp_cli()
    run = subprocess.run([exe, "bench", "decode"], capture_output=True, text=True,
                         env=env_with_package(PATH=str(tmp_path)))  # no python3 there
    assert run.returncode == 2 and "python3 not found on the PATH: install Python 3" in run.stderr
    # A python3 that ignores PYTHONPATH and site-packages: no turboattn package.
    bare = python3_dir(tmp_path, f'#!/bin/sh\nexec "{sys.executable}" -I -S "$@"\n')
    run = subprocess.run([exe, "calibrate", "x"], capture_output=True, text=True, env=env_with_package(PATH=bare))
    assert run.returncode == 2 and "python3 has no turboattn package: install the Python package: pip install ." in \
        run.stderr


def test_demo_and_eval_name_a_bad_model_or_configuration(tmp_path, capsys):
    pytest.importorskip("transformers")
    assert cli.main(["eval", "--only", "kv4", "kv3", "mix50_best"]) == 2
    err = capsys.readouterr().err
    assert "unknown configuration(s) ['kv3', 'mix50_best']" in err and "'kivi2'" in err
    for command in ("demo", "eval"):
        assert cli.main([command, "--model", str(tmp_path / "none.gguf")]) == 2
        assert f"no GGUF file {tmp_path / 'none.gguf'}" in capsys.readouterr().err
        assert cli.main([command, "--model", "llama-9000"]) == 2
        assert "not one of ['smollm2-135m']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--bits", "3"])
    assert cli.main(["eval", "--device", "tpu"]) == 2
    assert "--device tpu: expected cpu, cuda or cuda:N" in capsys.readouterr().err
    import torch
    if not (torch.cuda.is_available() and turboattn.cuda_available()):
        assert cli.main(["demo", "--device", "cuda"]) == 2
        assert "demo --device cuda: " in capsys.readouterr().err

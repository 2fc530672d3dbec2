"""`turboattn bench serve` (issue 7) on the CPU with a random model: its generation loop against
transformers' generate(), the KV memory budget arithmetic against what the caches hold, and the results
file. The numbers themselves come from a GPU run (docs/BENCHMARKS.md)."""
import json
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
import turboattn  # noqa: E402
from turboattn import cli  # noqa: E402
from turboattn.benchmarks import serve  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
MIX = [4, 2, 2, 2, 4, 4]  # 2 layers x 3 KV heads, half at 2 bits


@pytest.fixture(scope="module")
def configs():
    return serve.Configs(serve.tiny_model("cpu"), MIX)


def prompt_ids(batch, n, seed):
    return torch.randint(1, 512, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("config", [c for c in serve.CONFIGS if not c.endswith(serve.GRAPHS)])
def test_the_loop_generates_what_generate_does(configs, config):
    ids = prompt_ids(3, 70, seed=len(config))
    configs.use(config)
    got, measured = serve.generate(configs, config, ids, 6)
    want = configs.model.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=None)[:, ids.shape[1]:]
    assert torch.equal(got, want)
    assert measured["tokens_per_s"] > 0 and measured["per_token_ms"] > 0 and measured["ttft_ms"] > 0
    assert 0 < measured["attention_host_ms_per_step"] < measured["per_token_ms"]
    if config in serve.FP16_CONFIGS:
        assert measured["library_host_ms_per_step"] == 0
    else:  # the library calls happen inside the attention function
        assert 0 < measured["library_host_ms_per_step"] < measured["attention_host_ms_per_step"]
    assert not isinstance(turboattn.lib, serve._TimedLibrary)
    assert measured["kv_cache_gib"] > 0


def test_static_cache_steps_give_the_preallocated_caches_tokens(configs, monkeypatch):
    """fp16_graphs' cache and attention (a write at the GPU-held position, attention over the whole buffer
    with the mask of written slots), stepped eagerly on the CPU without a graph: fp16_prealloc's tokens."""
    ids, new = prompt_ids(2, 70, seed=5), 6
    configs.use("fp16_prealloc")
    want, _ = serve.generate(configs, "fp16_prealloc", ids, new)
    configs.use("fp16_graphs")
    cache = serve.StaticCache(configs.shape, 2, 70 + new, configs.model.dtype, "cpu")
    monkeypatch.setattr(serve.StaticGraphDecoder, "current", type("Current", (), {"cache": cache}))
    kw = {configs.cache_kwarg: cache, "use_cache": True, "logits_to_keep": 1}
    with torch.no_grad():
        got = [configs.model(input_ids=ids, **kw).logits[:, -1].argmax(-1, keepdim=True)]
        for i in range(new - 1):
            cache.position.fill_(70 + i)
            step = configs.model(input_ids=got[-1], position_ids=cache.position.view(1, 1), **kw)
            got.append(step.logits[:, -1].argmax(-1, keepdim=True))
    assert cache.valid[0, 0, 0].sum().item() == 70 + new - 1  # the prompt and the five steps' slots
    assert torch.equal(torch.cat(got, dim=1), want)


@pytest.mark.skipif(not (torch.cuda.is_available() and turboattn.cuda_available()),
                    reason="needs a CUDA device and a CUDA build of libturboattn")
@pytest.mark.parametrize("config", [c for c in serve.CONFIGS if c.endswith(serve.GRAPHS)])
def test_graph_configurations_generate_what_their_eager_ones_do(config):
    configs = serve.Configs(serve.tiny_model("cuda").half(), MIX)
    ids = prompt_ids(3, 70, seed=3).cuda()
    configs.use(config)
    got, measured = serve.generate(configs, config, ids, 12, profile=True)
    assert measured["attention_ms_per_step"] > 0, measured.get("profile_error")
    eager = "fp16_prealloc" if config == "fp16_graphs" else config.removesuffix(serve.GRAPHS)
    configs.use(eager)
    want, _ = serve.generate(configs, eager, ids, 12)
    assert torch.equal(got, want)
    assert measured["tokens_per_s"] > 0 and measured["per_token_ms"] > 0


def test_host_clock_counts_the_time_inside_the_attention_function_and_restores_it(configs, monkeypatch):
    config = "fp16"
    impl = serve.attention_implementation(config)
    original = serve.ALL_ATTENTION_FUNCTIONS[impl]

    def slow(*args, **kwargs):
        time.sleep(0.005)
        return original(*args, **kwargs)

    serve.AttentionInterface.register(impl, slow)
    try:
        configs.use(config)
        _, measured = serve.generate(configs, config, prompt_ids(2, 20, seed=2), 4)
    finally:
        serve.AttentionInterface.register(impl, original)
    layers = configs.shape[0]
    assert measured["attention_host_ms_per_step"] >= 5.0 * layers
    assert serve.ALL_ATTENTION_FUNCTIONS[impl] is original


@pytest.mark.parametrize("config", ["kv4", "kv4_sdpa_prefill", "mix50_sdpa_prefill"])
def test_sdpa_prefill_configs_route_the_prompt_through_sdpa(configs, config, monkeypatch):
    calls = []
    original = serve.hf._sdpa_attention
    monkeypatch.setattr(serve.hf, "_sdpa_attention", lambda *a: calls.append(1) or original(*a))
    configs.use(config)
    serve.generate(configs, config, prompt_ids(2, 70, seed=1), 3)
    layers = configs.shape[0]
    assert len(calls) == (layers if config.endswith(serve.SDPA_PREFILL) else 0)
    assert configs.cache_bits(config) == configs.cache_bits(config.removesuffix(serve.SDPA_PREFILL))


@pytest.mark.parametrize("config", serve.CONFIGS)
def test_the_largest_batch_fits_the_budget_and_one_more_does_not(configs, config):
    bits = configs.cache_bits(config)
    max_len = 70 + 6 + serve.PROFILE_STEPS

    def size(batch):
        if config in serve.FP16_CONFIGS:
            return turboattn.dense_kv_bytes_per_token(*configs.shape) * max_len * batch
        return serve.turbo_cache_bytes(configs.shape, bits, batch, max_len)

    budget = 3 << 20
    largest = serve.largest_batch(config, configs.shape, bits, max_len, budget)
    assert largest >= 2 and size(largest) <= budget < size(largest + 1)


@pytest.mark.parametrize("prompt", [125, 130])  # the last tokens just before, and just past, a block
@pytest.mark.parametrize("config", ["kv4", "mix50"])
def test_a_turboattn_cache_sized_by_the_budget_holds_the_whole_run(configs, config, prompt):
    # generate() sizes the cache's pages as largest_batch counts them; running out raises OutOfCapacity.
    configs.use(config)
    got, measured = serve.generate(configs, config, prompt_ids(2, prompt, seed=prompt), 4, profile=True)
    assert got.shape == (2, 4) and measured["profile_error"] is None


def test_prealloc_cache_refuses_tokens_past_its_length():
    cache = serve.PreallocatedCache((1, 2, 64), 1, 4, torch.float32, "cpu")
    cache.update(torch.randn(1, 2, 3, 64), torch.randn(1, 2, 3, 64), 0)
    with pytest.raises(RuntimeError, match="3 \\+ 2 tokens exceed its 4"):
        cache.update(torch.randn(1, 2, 2, 64), torch.randn(1, 2, 2, 64), 0)


def test_the_plan_runs_the_largest_batches_first_then_the_long_rows_then_the_sweep(configs):
    assert serve.sweep_batches(100) == [50, 25, 6] and serve.sweep_batches(3) == [1] and serve.sweep_batches(1) == []
    budget = 1 << 20
    plan = serve.build_plan(configs, ["fp16", "kv4"], [64, 128], 4, budget, False, 256)
    largest = {(n, c): serve.largest_batch(c, configs.shape, configs.cache_bits(c), n + 4 + serve.PROFILE_STEPS, budget)
               for n in (64, 128, 256) for c in ("fp16", "kv4")}
    head = [(n, c, largest[n, c], largest[n, c], True) for n in (64, 128) for c in ("fp16", "kv4")]
    long = [(256, c, b, largest[256, c], b == largest[256, c]) for c in ("fp16", "kv4") for b in sorted({1, largest[256, c]})]
    assert plan[:len(head)] == head and plan[len(head):len(head) + len(long)] == long
    sweep = plan[len(head) + len(long):]
    assert sweep and all(not profile and b < largest[n, c] for n, c, b, _, profile in sweep)
    assert serve.build_plan(configs, ["fp16", "kv4"], [64, 128], 4, budget, True, 256) == head + long


def test_main_writes_the_results_file(tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert cli.main(["bench", "serve", "--model", "tiny", "--device", "cpu", "--budget-gib", "0.002", "--prompts",
                     "64", "--gen-len", "3", "--long-prompt", "130", "--quick", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert {"card", "commit", "date", "rows", "budget_gib", "model", "max_throughput"} <= set(data)
    assert data["card"] == "CPU" and data["model"]["head_dim"] == 64
    rows = data["rows"]
    # --quick: each configuration's largest batch; the long row also at batch 1.
    assert [(r["config"], r["prompt_len"]) for r in rows if r["prompt_len"] == 64] == [
        (c, 64) for c in serve.DEFAULT_CONFIGS]
    assert sorted(r["batch"] for r in rows if r["prompt_len"] == 130 and r["config"] == "kv4")[0] == 1
    for r in rows:
        assert r["error"] is None, r
        assert {"config", "batch", "prompt_len", "gen_len", "tokens_per_s", "peak_mem_gib"} <= set(r)
        assert r["gen_len"] == 3 and r["tokens_per_s"] > 0 and r["batch"] <= r["largest_batch"]
    fp16 = {r["prompt_len"]: r["largest_batch"] for r in rows if r["config"] == "fp16"}
    kv4 = {r["prompt_len"]: r["largest_batch"] for r in rows if r["config"] == "kv4"}
    assert all(kv4[n] > fp16[n] for n in fp16)  # the point of the compressed cache
    assert data["mix50_head_bits"].count(2) == 3 and set(data["mix50_head_bits"]) == {2, 4}
    assert set(data["max_throughput"]["64"]) == set(serve.DEFAULT_CONFIGS)
    assert data["planned_rows"] == len(rows)
    assert "max throughput:" in capsys.readouterr().out


def test_repeats_run_rounds_and_keep_each_configurations_best(tmp_path):
    out = tmp_path / "serve.json"
    assert cli.main(["bench", "serve", "--model", "tiny", "--device", "cpu", "--configs", "fp16", "kv4", "--budget-gib",
                     "0.002", "--prompts", "64", "--gen-len", "3", "--long-prompt", "0", "--quick", "--repeats", "2",
                     "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    # Round after round: every configuration once in each, in the plan's order.
    assert [(r["repeat"], r["config"]) for r in data["rows"]] == [(0, "fp16"), (0, "kv4"), (1, "fp16"), (1, "kv4")]
    assert data["repeats"] == 2 and data["planned_rows"] == 4
    for config in ("fp16", "kv4"):
        best = max(r["tokens_per_s"] for r in data["rows"] if r["config"] == config)
        assert data["max_throughput"]["64"][config]["tokens_per_s"] == best


def test_append_adds_a_second_calls_rows_to_the_same_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOATTN_COMMIT", "abc1234")  # a known commit, as the device runs set it
    out = tmp_path / "serve.json"
    base = ["bench", "serve", "--model", "tiny", "--device", "cpu", "--budget-gib", "0.002", "--gen-len", "3",
            "--quick", "--out", str(out)]
    assert cli.main(base + ["--configs", "fp16", "kv4", "--prompts", "64", "--long-prompt", "0"]) == 0
    first = json.loads(out.read_text())
    assert cli.main(base + ["--append", "--configs", "fp16", "mix50", "--prompts", "--long-prompt", "130"]) == 0
    data = json.loads(out.read_text())
    assert data["rows"][:len(first["rows"])] == first["rows"]
    later = data["rows"][len(first["rows"]):]
    assert {r["call"] for r in first["rows"]} == {0} and later and {r["call"] for r in later} == {1}
    assert {r["prompt_len"] for r in later} == {130} and {r["config"] for r in later} == {"fp16", "mix50"}
    assert set(data["max_throughput"]) == {"64", "130"} and set(data["max_throughput"]["130"]) == {"fp16", "mix50"}
    assert set(data["max_throughput"]["64"]) == {"fp16", "kv4"}
    assert data["planned_rows"] == first["planned_rows"] + data["calls"][1]["planned_rows"]
    assert len(data["calls"]) == 2 and data["calls"][0]["seconds"] == first["seconds"]
    assert data["seconds"] == pytest.approx(sum(c["seconds"] for c in data["calls"]), abs=0.11)
    assert set(data["largest_context"]) == {"fp16", "kv4", "mix50"}

    data["commit"] = "0000000"  # rows from another commit are not mixed in
    out.write_text(json.dumps(data))
    with pytest.raises(SystemExit, match="another commit"):
        cli.main(base + ["--append", "--configs", "fp16", "--prompts", "64", "--long-prompt", "0"])
    assert json.loads(out.read_text()) == data
    out.write_text(json.dumps(data)[:100])  # cut short, as by a killed call
    with pytest.raises(SystemExit, match="cannot read"):
        cli.main(base + ["--append", "--configs", "fp16", "--prompts", "64", "--long-prompt", "0"])


def test_a_time_limit_stops_starting_rows_and_keeps_the_file(tmp_path, capsys):
    out = tmp_path / "serve.json"
    assert cli.main(["bench", "serve", "--model", "tiny", "--device", "cpu", "--configs", "fp16", "kv4", "--budget-gib",
                     "0.002", "--prompts", "64", "--gen-len", "3", "--long-prompt", "0", "--time-limit", "1e-6",
                     "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["rows"] == [] and data["planned_rows"] > 0
    assert "rows not run" in capsys.readouterr().out


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "serve", "--configs", "fp32"])
    assert e.value.code == 2 and "invalid choice: 'fp32'" in capsys.readouterr().err


def test_attention_time_counts_kernels_once():
    # What torch.profiler lists for one step: the attention range on the host with the kernels its ops
    # launched, the same range again as a GPU-side annotation spanning them (not a kernel), turboattn's
    # own kernels (tied to no range) and the rest of the step's kernels.
    from types import SimpleNamespace as NS
    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    kernel = lambda name, us: NS(name=name, device_type=cuda, device_time_total=us, is_user_annotation=False)
    copy = NS(name="aten::copy_", device_type=cpu, kernels=[NS(name="copy_kernel", duration=10.0)], cpu_children=[])
    host_range = NS(name=serve.ATTENTION_RANGE, device_type=cpu, kernels=[], cpu_children=[copy])
    annotation = NS(name=serve.ATTENTION_RANGE, device_type=cuda, device_time_total=500.0, is_user_annotation=True)
    events = [host_range, copy, annotation, kernel("copy_kernel", 10.0),
              kernel("void turboattn::cuda::cache_decode_kernel<64>(...)", 300.0), kernel("gemm", 1000.0)]
    attention, busy = serve.attention_and_busy_ms(NS(events=lambda: events))
    assert attention == pytest.approx(0.31) and busy == pytest.approx(1.31)

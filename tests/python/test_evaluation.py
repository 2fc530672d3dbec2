"""turboattn.evaluation (docs/ACCURACY.md): the corpus reader, the KIVI-style baseline, the head
selections, the configurations, and the protocol on a tiny random Llama model (no downloads). The runs
on the real model and text are in test_real_model.py."""
import math
import random
import struct

import pytest

import bench_script

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import turboattn  # noqa: E402
from turboattn import assign_head_bits  # noqa: E402
from turboattn.evaluation import corpus, evaluate, kivi  # noqa: E402


def _r_strings(lines, version=3):
    """An XDR-serialized R character vector, as R writes it (NA for None)."""
    out = b"X\n" + struct.pack(">iii", version, 0x40200, 0x30500)
    if version == 3:
        out += struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 16, len(lines))
    for s in lines:
        if s is None:
            out += struct.pack(">ii", 9, -1)
        else:
            b = s.encode("utf-8")
            out += struct.pack(">ii", 0x40009, len(b)) + b
    return out


@pytest.mark.parametrize("version", [2, 3])
def test_r_character_vector(version):
    lines = ["EMMA", "", "Emma Woodhouse, handsome, clever, and rich,", None, "caf\u00e9"]
    assert corpus._read_r_strings(_r_strings(lines, version)) == [s or "" for s in lines]
    with pytest.raises(ValueError, match="character vector"):
        corpus._read_r_strings(_r_strings(["x"], version).replace(struct.pack(">ii", 16, 1), struct.pack(">ii", 19, 1)))
    with pytest.raises(ValueError, match="XDR"):
        corpus._read_r_strings(b"A\n" + _r_strings(["x"], version)[2:])


def test_novels_from_a_database(tmp_path):
    import zlib
    novels = {"EMMA": ["EMMA", "", "By Jane Austen", "", "Emma Woodhouse,", "handsome, clever."],
              "Persuasion": ["Persuasion", "", "Sir Walter Elliot,", "of Kellynch Hall."]}
    novels.update({t: [t, "", "Chapter 1"] for t in corpus.TITLES if t not in ("EMMA", "PERSUASION")})
    path = tmp_path / "Rdata.rdb"
    with open(path, "wb") as f:
        for lines in novels.values():
            raw = _r_strings(lines)
            f.write(struct.pack(">I", len(raw)) + zlib.compress(raw))
    got = corpus.austen_novels(str(path))
    assert set(got) == set(corpus.TITLES.values())
    assert got["emma"] == "EMMA\n\nBy Jane Austen\n\nEmma Woodhouse, handsome, clever."  # paragraphs unwrapped
    assert got["persuasion"].endswith("Sir Walter Elliot, of Kellynch Hall.")
    with open(path, "ab") as f:  # a seventh record, a second Emma
        raw = _r_strings(["EMMA", "again"])
        f.write(struct.pack(">I", len(raw)) + zlib.compress(raw))
    with pytest.raises(ValueError, match="twice"):
        corpus.austen_novels(str(path))


def test_token_windows_and_passkey_prompt():
    ids = list(range(1000))
    w = corpus.token_windows(ids, 100, 4, skip=200)
    assert [x[0] for x in w] == [200, 400, 600, 800] and all(len(x) == 100 for x in w)
    with pytest.raises(ValueError, match="fewer than"):
        corpus.token_windows(ids, 300, 4)

    class Chars:  # a tokenizer of one id per character
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}
    tok = Chars()
    hay = [ord("a")] * 5000
    for depth in (0.0, 0.5, 1.0):
        ctx, question = corpus.passkey_prompt(tok, hay, 2000, depth, 12345)
        assert len(ctx) + len(question) == 2000 and ctx[0] == 1
        text = "".join(map(chr, ctx[1:]))
        at = text.index("The pass key is 12345")
        body = text[len(corpus.PASSKEY_INTRO):]
        needle = " The pass key is 12345. Remember it. 12345 is the pass key. "
        fill = len(body) - len(needle)
        assert body.replace(needle, "") == "a" * fill
        assert abs(body.index(needle) - depth * fill) <= 1
        assert at > 0 and "".join(map(chr, question)) == corpus.PASSKEY_QUESTION
    with pytest.raises(ValueError, match="haystack"):
        corpus.passkey_prompt(tok, hay, 50, 0.5, 12345)
    keys = corpus.passkeys(5, seed=3)
    assert keys == corpus.passkeys(5, seed=3) and all(10000 <= k < 100000 for k in keys)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_fake_quantize_grid_and_error(bits):
    torch.manual_seed(bits)
    x = torch.randn(2, 3, 64, 64) * torch.rand(1, 1, 1, 64) * 4
    for dim, group in ((-2, 32), (-1, 64)):
        y = kivi.fake_quantize(x, bits, group, dim)
        g = y.movedim(dim, -1).reshape(2, 3, 64, -1, group)
        gx = x.movedim(dim, -1).reshape(2, 3, 64, -1, group)
        levels = (1 << bits) - 1
        assert max(len(torch.unique(row)) for row in g.reshape(-1, group)) <= levels + 1
        step = (gx.amax(-1) - gx.amin(-1)) / levels
        assert ((g - gx).abs().amax(-1) <= step * 0.5 * 1.01 + 1e-3).all()  # half a step, fp16 parameters
    assert kivi.fake_quantize(torch.zeros(1, 1, 64, 64), bits, 32, -2).abs().max() == 0


def test_kivi_cache_quantizes_what_leaves_the_window():
    torch.manual_seed(0)
    layer = kivi.KiviLayer(bits=2, group=32, residual=64)
    k, v = torch.randn(1, 2, 100, 64), torch.randn(1, 2, 100, 64)
    seen_k, seen_v = layer.update(k, v)
    assert torch.equal(seen_k, k) and torch.equal(seen_v, v)  # the prefill attends over its own inputs
    # K: one group-aligned window of 64 quantized, 36 in fp16; V: all but the newest 64 quantized.
    assert (layer.k_quantized, layer.v_quantized) == (64, 36)
    assert not torch.equal(layer.keys[..., :64, :], k[..., :64, :]) and torch.equal(layer.keys[..., 64:, :], k[..., 64:, :])
    assert not torch.equal(layer.values[..., :36, :], v[..., :36, :]) and torch.equal(layer.values[..., 36:, :], v[..., 36:, :])
    for _ in range(27):  # 127 tokens: K's window holds 63, V's 64
        layer.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64))
    assert (layer.k_quantized, layer.v_quantized) == (64, 63)
    layer.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64))
    assert (layer.k_quantized, layer.v_quantized) == (128, 64)
    layer.reset()
    assert (layer.k_quantized, layer.v_quantized) == (0, 0)
    with pytest.raises(ValueError, match="multiple"):
        kivi.KiviLayer(bits=2, group=48, residual=64)


def test_kivi_crop_keeps_the_counters_within_the_tokens():
    torch.manual_seed(0)
    layer = kivi.KiviLayer(bits=4, group=32, residual=64)
    layer.update(torch.randn(1, 2, 150, 64), torch.randn(1, 2, 150, 64))
    assert (layer.k_quantized, layer.v_quantized) == (128, 86)
    kept_k = layer.keys[..., :100, :].clone()
    layer.crop(-50)  # transformers 5: a negative count of tokens to drop
    assert layer.get_seq_length() == 100 and torch.equal(layer.keys, kept_k)
    assert (layer.k_quantized, layer.v_quantized) == (100, 86)
    for _ in range(28):  # 128 tokens: K's next window of 64 starts at 100 and is not yet full
        layer.update(torch.randn(1, 2, 1, 64), torch.randn(1, 2, 1, 64))
    assert (layer.k_quantized, layer.v_quantized) == (100, 86)
    layer.update(torch.randn(1, 2, 36, 64), torch.randn(1, 2, 36, 64))  # 164: 100 + 64 quantized
    assert (layer.k_quantized, layer.v_quantized) == (164, 100)


def test_hqq_cache_bytes_match_the_counted_figure():
    # The asymptotic bytes per token counted for transformers' QuantizedCache (codes plus an fp16 scale
    # and zero per group) against what its hqq backend stores for the tokens it has quantized.
    pytest.importorskip("hqq")
    from transformers import LlamaConfig
    from transformers.cache_utils import QuantizedCache
    cfg = LlamaConfig(num_hidden_layers=1, num_attention_heads=6, num_key_value_heads=3, hidden_size=384, head_dim=64)
    for bits in (4, 2):
        cache = QuantizedCache(backend="hqq", config=cfg, nbits=bits, q_group_size=64, residual_length=128)
        cache.update(torch.randn(1, 3, 1000, 64, dtype=torch.float16), torch.randn(1, 3, 1000, 64, dtype=torch.float16), 0)
        for _ in range(77):
            cache.update(torch.randn(1, 3, 1, 64, dtype=torch.float16), torch.randn(1, 3, 1, 64, dtype=torch.float16), 0)
        layer = cache.layers[0]
        stored = sum(t.numel() * t.element_size() for q in (layer._quantized_keys, layer._quantized_values)
                     for t in (q[0], q[1]["scale"], q[1]["zero"]))
        in_fp16 = layer.keys.shape[-2] if layer.keys.numel() else 0
        asymptote, _ = kivi.kivi_bytes_per_token(bits, 64, 128, 1077, layers=1, kv_heads=3, head_dim=64)
        assert stored / (1077 - in_fp16) == asymptote


def test_kivi_bytes_per_token():
    asym, at = kivi.kivi_bytes_per_token(2, 32, 64, 1000, layers=2, kv_heads=3, head_dim=64)
    per_token = 2 * 3 * 64  # of K, and of V
    per_value = 2 / 8 + 4 / 32
    assert asym == pytest.approx(2 * per_token * per_value)
    k_bytes = 960 * per_value + 40 * 2  # 40 K tokens in the fp16 window
    v_bytes = 936 * per_value + 64 * 2  # V's window: always the newest 64
    assert at == pytest.approx(per_token * (k_bytes + v_bytes) / 1000)


def test_mixed_bits_selections():
    layers, heads = 4, 6
    rng = random.Random(1)
    priority = [rng.random() for _ in range(layers * heads)]
    for f in (1 / 6, 0.5, 5 / 6):
        k = round(f * heads)
        by = {s: evaluate._mixed_bits(priority, layers, heads, f, s) for s in ("priority", "random", "index")}
        for bits in by.values():
            assert all(sorted(bits[l * heads:(l + 1) * heads]).count(2) == k for l in range(layers))
        assert by["priority"] == assign_head_bits(priority, layers, heads, f)
        assert by["index"] == ([2] * k + [4] * (heads - k)) * layers
        assert by["random"] == evaluate._mixed_bits(priority, layers, heads, f, "random")  # seeded


def test_configurations():
    cfgs = evaluate.configurations([1.0] * 6, 2, 3)
    names = [c.name for c in cfgs]
    assert names[0] == "fp16" and len(set(names)) == len(names)
    # 3 KV heads per layer: 25% rounds to one head, 50% and 75% to two; each mix once per selection.
    assert [n for n in names if n.startswith("mix")] == [f"mix{p}_{s}" for p in (33, 67)
                                                         for s in ("priority", "random", "index")]
    for needed in ("flashq_prefill", "kv8", "kv4", "kv2", "kv4_no_sas", "kv4_no_smooth_k", "kivi4", "kivi4_g64", "kivi2"):
        assert needed in names
    # KIVI-style 4-bit near our 4-bit cache's memory: groups of 64 (SmolLM2-135M's shape: 30 layers, 3 KV
    # heads, D = 64), 6480 B per token against 7200 with groups of 32.
    by_kivi = {c.name: c for c in cfgs if c.cache == "kivi"}
    assert [kivi.kivi_bytes_per_token(c.bits, c.kivi_group, c.kivi_residual, 4096, 30, 3, 64)[0]
            for c in (by_kivi["kivi4_g64"], by_kivi["kivi4"])] == [6480.0, 7200.0]
    assert {c.name for c in cfgs if c.cache == "fp16"} == {"fp16", "flashq_prefill"}
    # With measured sensitivities: model-wide mixes at the fractions (of 6 heads: 2, 3 and 5, halves
    # rounded away from zero), the least sensitive heads at 2 bits, and a model-wide random one at 50%.
    sens = [0.5, 0.1, 0.9, 0.3, 0.2, 0.7]
    by = {c.name: c for c in evaluate.configurations([1.0] * 6, 2, 3, sensitivity=sens)}
    assert by["mix33_sensitivity"].head_bits == [4, 2, 4, 4, 2, 4]
    assert by["mix50_sensitivity"].head_bits == [4, 2, 4, 2, 2, 4] and by["mix50_sensitivity"].passkey
    assert by["mix83_sensitivity"].head_bits == [2, 2, 4, 2, 2, 2]
    assert by["mix50_random_model"].head_bits.count(2) == 3


@pytest.fixture
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval()


def _on(device):
    if device == "cuda" and not (torch.cuda.is_available() and turboattn.cuda_available()):
        pytest.skip("needs a CUDA device and a CUDA build of libturboattn")
    return device


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_protocol_on_a_tiny_model(tiny_model, device):
    """Every kind of configuration through the protocol; on CUDA the model runs in fp16 with the kernels."""
    model = tiny_model.to(_on(device), torch.float16 if device == "cuda" else torch.float32)
    runner = evaluate.Runner(model)
    torch.manual_seed(1)
    prefix, steps = 130, 5  # a partial page in the prefix, a flush during the steps
    windows = torch.randint(0, 256, (2, prefix + steps + 1), device=device)
    cfgs = {c.name: c for c in evaluate.configurations([1.0] * 4, 2, 2)}
    results, ref = {}, None
    for name in ("fp16", "flashq_prefill", "kv8", "kv4", "kv2", "kivi4", "kivi2"):
        pre, dec, cache = evaluate.run_windows(runner, cfgs[name], windows, prefix, steps, 16)
        assert pre.shape == (2, 16, 256) and dec.shape == (2, steps, 256) and torch.isfinite(dec).all()
        if cfgs[name].cache == "turbo":
            assert cache.cache_device.startswith(device)
        if ref is None:
            ref = (torch.log_softmax(pre, -1), torch.log_softmax(dec, -1))
        results[name] = evaluate._metrics(dec, ref[1], windows[:, prefix + 1:])
        results[name]["bytes"] = runner.bytes_per_token(cfgs[name], cache, prefix + steps + 1)
    assert results["fp16"]["kl"] == pytest.approx(0, abs=1e-6) and results["fp16"]["agree"] == 10
    for r in results.values():  # each window's mean KL, over its `steps` positions
        assert len(r["kl_windows"]) == 2 and sum(r["kl_windows"]) * steps == pytest.approx(r["kl"], rel=1e-5, abs=1e-9)
    assert results["kv8"]["kl"] < results["kv4"]["kl"] < results["kv2"]["kl"]
    assert results["kivi4"]["kl"] < results["kivi2"]["kl"]
    assert 0 < results["flashq_prefill"]["kl"] < results["kv2"]["kl"]
    fp16 = 2 * 2 * 2 * 64 * 2  # K and V, layers, heads, dim, bytes
    assert results["fp16"]["bytes"] == (fp16, fp16)
    asym = [results[n]["bytes"][0] for n in ("kv8", "kv4", "kv2")]
    assert asym == sorted(asym, reverse=True) and fp16 / asym[1] == pytest.approx(3.71, abs=0.01)
    for name in ("kv8", "kv4", "kv2"):  # at 136 tokens: two pages and the buffer
        assert results[name]["bytes"][1] > results[name]["bytes"][0]
    nll = results["fp16"]["nll"] / results["fp16"]["n"]
    assert math.isfinite(nll) and nll > 0


def test_prefill_only_leaves_the_cache_exact(tiny_model):
    """flashq_prefill: FlashQ + SAS in the prefill forward, then FP16 attention over an exact cache."""
    runner = evaluate.Runner(tiny_model)
    windows = torch.randint(0, 256, (1, 70))
    cfgs = {c.name: c for c in evaluate.configurations([1.0] * 4, 2, 2)}
    pre_q, dec_q, cache_q = evaluate.run_windows(runner, cfgs["flashq_prefill"], windows, 64, 5, 8)
    pre_f, dec_f, cache_f = evaluate.run_windows(runner, cfgs["fp16"], windows, 64, 5, 8)
    assert type(cache_q).__name__ == "DynamicCache" and tiny_model.config._attn_implementation == "sdpa"
    assert not torch.equal(pre_q, pre_f)  # the prefill differs (INT8) ...
    assert (pre_q - pre_f).abs().max() < 0.2 * pre_f.abs().max()  # ... within quantization error


def _format_variants():
    return bench_script.load("kv_format_variants")


@pytest.mark.parametrize("bits", [4, 2])
def test_format_simulation_is_the_library_cache(bits):
    # bench/kv_format_variants.py re-implements the cache format in PyTorch (docs/ACCURACY.md); its
    # variant of today's format must read back what the library's cache does, or its other variants
    # mean nothing. Outlier channels in K, outlier tokens in V, quiet channels whose INT8 codes sit on
    # few levels (where the stage-2 zero's rule shows).
    sim = _format_variants()
    n, heads, dim = 64 * 3 + 37, 2, 64
    g = torch.Generator().manual_seed(random.randrange(1 << 30))
    k = torch.randn(n, heads, dim, generator=g)
    k[..., 5] *= 12
    k[..., 40:48] *= 0.05
    v = torch.randn(n, heads, dim, generator=g)
    v[torch.randint(0, n, (6,), generator=g)] *= 9
    k, v = k.half(), v.half()
    cache = turboattn.KVCache(1, heads, dim, num_pages=8, max_seqs=1, max_seq_len=n, head_bits=[bits] * heads)
    seq = cache.add_sequence()
    cache.write(0, [seq], k, v, torch.tensor([0, n], dtype=torch.int32))
    k_read, v_read = cache.read(0, seq)
    k_grouping = "chan16" if bits == 2 else "chan"  # K's grids: 16 tokens at 2 bits, 64 at 4 (FORMATS 3.3)

    def simulate(k_grouping=k_grouping, **options):
        # [1, heads, n, dim] in, as attention holds them; what the layer holds out
        layer = sim.VariantLayer(bits, bits, k_grouping, "tok", **options)
        layer.update(k.float().transpose(0, 1)[None], v.float().transpose(0, 1)[None])
        return layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)

    k_sim, v_sim = simulate(first_block=True)
    assert torch.allclose(k_read, k_sim, rtol=0, atol=1e-5) and torch.allclose(v_read, v_sim, rtol=0, atol=1e-5)
    # Other formats: the other K grouping, the first block compressed, another rule for the zero; the test
    # tells them apart.
    k_other, _ = simulate("chan32" if bits == 2 else "chan16", first_block=True)
    assert not torch.allclose(k_read, k_other, rtol=0, atol=1e-5)
    for other in ({}, {"first_block": True, "least_squares": True}):
        k_other, v_other = simulate(**other)
        assert not torch.allclose(k_read, k_other, rtol=0, atol=1e-5), other
        assert not torch.allclose(v_read, v_other, rtol=0, atol=1e-5), other


def test_paired_kl_resamples_windows_and_names_the_lower():
    from turboattn.evaluation import report
    result = {"rows": [{"config": "a", "decode": {"kl_by_window": [1.0, 2.0, 3.0, 4.0]}},
                       {"config": "b", "decode": {"kl_by_window": [1.5, 2.0, 3.5, 4.2]}},
                       {"config": "ref", "decode": {"kl_by_window": [0.0] * 4}},
                       {"config": "short", "decode": {"kl_by_window": [1.0]}},
                       {"config": "old", "decode": {"kl": 1.0}}]}
    r = report.paired_kl(result, "a", "b", resamples=2000)
    assert r["diff_rel"] == pytest.approx(10.0 / 11.2 - 1) and r["kl_a"] == pytest.approx(2.5)
    lo, hi = r["ci95_rel"]
    assert lo <= r["diff_rel"] <= hi and hi <= 0 and r["a_lower_in"] == 3  # never higher in any window
    with pytest.raises(KeyError, match="old: not in the results, or written without per-window KL"):
        report.paired_kl(result, "a", "old")
    with pytest.raises(ValueError, match="KL is zero"):
        report.paired_kl(result, "a", "ref")
    with pytest.raises(ValueError, match="not the same run"):
        report.paired_kl(result, "a", "short")

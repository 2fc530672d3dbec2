"""turboattn.hf: transformers models generating through turboattn (prefill) and the compressed cache
(decode), on the CPU, with tiny randomly initialised models built from configs (no downloads)."""
import json
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import turboattn  # noqa: E402
import turboattn.hf as hf  # noqa: E402

L, HQ, HKV, D, VOCAB = 4, 8, 2, 64, 1000
# Later 5.x releases renamed generate()'s past_key_values to cache and warn about the old name; the
# tests keep the name that every supported version takes.
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


def cache_of(out):
    # `past_key_values`: generate()'s output field in every supported transformers (later 5.x
    # releases call it `cache` and keep this name as an alias).
    return out.past_key_values


def llama(seed=0, dtype=torch.float32, **overrides):
    torch.manual_seed(seed)
    kw = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=L, num_attention_heads=HQ,
              num_key_value_heads=HKV, head_dim=D, vocab_size=VOCAB, max_position_embeddings=1024, pad_token_id=0)
    kw.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw)).to(dtype).eval()


def tokens(n, seed=1, rows=1):
    return torch.randint(1, VOCAB, (rows, n), generator=torch.Generator().manual_seed(seed))


def generate(model, ids, new, **kw):
    # eos_token_id=None: a random model may emit the EOS id; every call must produce `new` tokens.
    return model.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=None, output_logits=True,
                          return_dict_in_generate=True, **kw)


def reference_logits(model, sequences, prompt_len):
    """Logits of every decoded position from the model's own attention (sdpa or eager, FP32, no cache)."""
    hf.unpatch(model)
    assert model.config._attn_implementation in ("sdpa", "eager")
    with torch.no_grad():
        return model(sequences).logits[0, prompt_len - 1:-1].float()


def step_cosines(out, ref, row=0):
    got = torch.stack([step[row] for step in out.logits]).float()
    return torch.nn.functional.cosine_similarity(got, ref)


def test_greedy_generate_produces_the_requested_tokens_through_the_cache():
    model = hf.patch(llama())
    assert model.config._attn_implementation == hf.ATTN_IMPLEMENTATION
    out = generate(model, tokens(70), 12)
    assert out.sequences.shape == (1, 70 + 12)
    cache = cache_of(out)
    assert isinstance(cache, hf.TurboCache)
    # The last token is never fed back, so the cache holds prompt + 11 tokens in every layer.
    assert cache.lengths == [[81]] * L and cache.get_seq_length() == 81
    assert all(cache.kv.length(layer, cache.seqs[0]) == 81 for layer in range(L))
    assert all(layer.keys is None and layer.values is None for layer in cache.layers)  # no uncompressed copy


def test_prefill_writes_once_and_each_step_appends_and_decodes(monkeypatch):
    calls = {"write": 0, "append": 0, "decode": 0, "append_decode": 0}
    for name in calls:
        original = getattr(turboattn.KVCache, name)

        def spy(self, *a, _name=name, _original=original, **kw):
            calls[_name] += 1
            return _original(self, *a, **kw)
        monkeypatch.setattr(turboattn.KVCache, name, spy)
    model = hf.patch(llama())
    generate(model, tokens(30), 6)
    # One bulk write per layer at prefill, then per step and layer one call that appends and decodes.
    assert calls == {"write": L, "append": 0, "decode": 0, "append_decode": 5 * L}


# Minimum cosine between each decode step's logits and the FP32 model's (measured on this model:
# 0.99988 at 8 bits, 0.9997 at 4, 0.9955 at 2).
@pytest.mark.parametrize("bits,min_cos", [(8, 0.999), (4, 0.998), (2, 0.98)])
def test_decode_logits_match_the_fp32_model(bits, min_cos):
    model = hf.patch(llama(), hf.TurboConfig(bits=bits))
    prompt = tokens(100)
    out = generate(model, prompt, 30)
    ref = reference_logits(model, out.sequences, 100)
    cos = step_cosines(out, ref)
    assert cos.min().item() > min_cos, cos
    if bits == 8:
        assert torch.equal(torch.stack([s[0] for s in out.logits]).argmax(-1), ref.argmax(-1))
    # The check has teeth: with the first 60 prompt tokens changed, the FP32 model's own logits at
    # the same positions are far off, so a cache that lost or garbled the context could not pass.
    other = out.sequences.clone()
    other[:, :60] = tokens(60, seed=7)
    with torch.no_grad():
        moved = model(other).logits[0, 99:-1].float()
    assert torch.nn.functional.cosine_similarity(moved, ref).mean().item() < 0.9


def test_sdpa_prefill_is_exact_and_decode_still_reads_the_compressed_cache():
    model = hf.patch(llama(), hf.TurboConfig(bits=4, prefill="sdpa"))
    ids = torch.zeros(2, 70, dtype=torch.long)
    mask = torch.zeros(2, 70, dtype=torch.long)
    ids[0], mask[0] = tokens(70, seed=2)[0], 1
    ids[1, 25:], mask[1, 25:] = tokens(45, seed=3)[0], 1
    out = generate(model, ids, 12, attention_mask=mask)
    cache = cache_of(out)
    memory = cache.memory()
    assert cache.lengths[0] == [81, 56] and memory["bytes_per_token"] < memory["fp16_bytes_per_token"] / 3
    flashq = generate(hf.patch(llama(), hf.TurboConfig(bits=4)), ids, 12, attention_mask=mask)
    hf.unpatch(model)
    fp16_path = generate(model, ids, 12, attention_mask=mask)  # the model's own SDPA
    # The prompt's last logits come from the prefill alone: SDPA's, up to the fp16 rounding of q, k, v.
    for row in (0, 1):
        first = (out.logits[0][row], fp16_path.logits[0][row], flashq.logits[0][row])
        exact = torch.nn.functional.cosine_similarity(first[0], first[1], dim=0).item()
        int8 = torch.nn.functional.cosine_similarity(first[2], first[1], dim=0).item()
        assert exact > 0.99999 and 1 - exact < (1 - int8) / 10, (exact, int8)
    # Later steps decode over the 4-bit cache: as close to the model's own logits on the same tokens
    # as with the FlashQ prefill (test_decode_logits_match_the_fp32_model).
    for row, start in ((0, 0), (1, 25)):
        ref = reference_logits(model, out.sequences[row:row + 1, start:], 70 - start)
        assert step_cosines(out, ref, row)[1:].min().item() > 0.998


def test_sdpa_prefill_without_enable_gqa_repeats_the_kv_heads(monkeypatch):
    """PyTorch before 2.5 has no enable_gqa: the K and V heads are repeated instead, same result."""
    q, k, v = (torch.randn(2, n, h, D, dtype=torch.float16) for n, h in ((5, HQ), (9, HKV), (9, HKV)))
    valid = torch.ones(2, 9, dtype=torch.bool)
    valid[1, :4] = False
    with_gqa = hf._sdpa_attention(q, k, v, valid, 0.0)
    monkeypatch.setattr(hf, "_SDPA_TAKES_GQA", False)
    repeated = hf._sdpa_attention(q, k, v, valid, 0.0)
    assert torch.allclose(with_gqa.float(), repeated.float(), atol=1e-3) and with_gqa.abs().sum() > 0


def test_bf16_model():
    model = hf.patch(llama(dtype=torch.bfloat16), hf.TurboConfig(bits=8))
    out = generate(model, tokens(50), 8)
    ref = reference_logits(model, out.sequences, 50)
    assert step_cosines(out, ref).min().item() > 0.99


def test_left_padded_batch_matches_each_sequence_alone():
    model = hf.patch(llama(), hf.TurboConfig(bits=4))
    a, b = tokens(70, seed=2), tokens(45, seed=3)
    ids = torch.zeros(2, 70, dtype=torch.long)
    mask = torch.zeros(2, 70, dtype=torch.long)
    ids[0], mask[0] = a[0], 1
    ids[1, 25:], mask[1, 25:] = b[0], 1
    out = generate(model, ids, 10, attention_mask=mask)
    assert cache_of(out).lengths[0] == [79, 54]  # padding is never cached
    for row, alone in ((0, a), (1, b)):
        single = generate(model, alone, 10)
        assert torch.equal(out.sequences[row, -10:], single.sequences[0, -10:])
        cos = [torch.nn.functional.cosine_similarity(x[row:row + 1], y).item() for x, y in zip(out.logits, single.logits)]
        assert min(cos) > 0.9999


def test_each_forward_reads_the_mask_once(monkeypatch):
    """Reading the mask syncs the device: once per forward at layer 0, not once per layer."""
    calls = []
    original = hf._valid_keys
    monkeypatch.setattr(hf, "_valid_keys", lambda *a: calls.append(1) or original(*a))
    model = hf.patch(llama(), hf.TurboConfig(bits=4))
    ids = torch.zeros(2, 30, dtype=torch.long)
    mask = torch.zeros(2, 30, dtype=torch.long)
    ids[0], mask[0] = tokens(30, seed=2)[0], 1
    ids[1, 10:], mask[1, 10:] = tokens(20, seed=3)[0], 1
    generate(model, ids, 5, attention_mask=mask)
    assert len(calls) == 5  # the prefill and 4 decode steps, each over L layers


def test_forward_without_cache_matches_sdpa_with_padding():
    model = hf.patch(llama())
    ids = tokens(40, rows=2)
    mask = torch.ones_like(ids)
    mask[1, :15] = 0
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    hf.unpatch(model)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.nn.functional.cosine_similarity(got[0], ref[0]).min().item() > 0.999
    assert torch.nn.functional.cosine_similarity(got[1, 15:], ref[1, 15:]).min().item() > 0.999


def test_second_turn_decodes_several_new_tokens_over_the_cache():
    model = hf.patch(llama(), hf.TurboConfig(bits=8))
    cache = hf.make_cache(model, batch_size=1, max_seq_len=300)
    first = model.generate(tokens(40), past_key_values=cache, max_new_tokens=5, do_sample=False, eos_token_id=None)
    more = torch.cat([first, tokens(7, seed=5)], 1)
    out = generate(model, more, 5, past_key_values=cache)  # 8 uncached tokens: one decode call with q_len 8
    assert cache_of(out) is cache
    assert cache.lengths[0] == [more.shape[1] + 4]
    ref = reference_logits(model, out.sequences, more.shape[1])
    assert step_cosines(out, ref).min().item() > 0.999


def page_bytes(bits_per_head, d):
    """One layer's page (docs/FORMATS.md 3.5): header of 2 * H fp32 scales, then per head K and V
    regions of 64 * D * b / 8 code bytes plus, below 8 bits, stage-2 metadata: 2 * D bytes for K per
    token group (per channel; one group at 4 bits, four at 2) and 2 * 64 for V (per token); the header and
    each region padded to 128 bytes."""
    line = lambda n: -(-n // 128) * 128
    header = line(2 * len(bits_per_head) * 4)
    k_meta = {8: 0, 4: 2 * d, 2: 8 * d}
    return header + sum(line(64 * d * b // 8 + k_meta[b]) + line(64 * d * b // 8 + (0 if b == 8 else 2 * 64))
                        for b in bits_per_head)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_cache_memory_per_token_against_fp16(bits):
    model = hf.patch(llama(), hf.TurboConfig(bits=bits))
    mem = cache_of(generate(model, tokens(20), 2)).memory()
    assert mem["fp16_bytes_per_token"] == L * HKV * D * 2 * 2
    assert mem["bytes_per_token"] == L * page_bytes([bits] * HKV, D) / 64
    ratio = mem["fp16_bytes_per_token"] / mem["bytes_per_token"]
    assert ratio == pytest.approx({8: 1.98, 4: 3.71, 2: 5.95}[bits], abs=0.01)  # 2 KV heads: the header weighs


def test_calibration_round_trip_changes_head_bits(tmp_path):
    model = llama()
    path = tmp_path / "bits.json"
    data = hf.calibrate(model, tokens(150, rows=2), 0.5, str(path), metric="gap_std")
    saved = json.loads(path.read_text())
    assert saved == data
    assert (saved["num_layers"], saved["num_kv_heads"], saved["fraction_2bit"], saved["tokens"]) == (L, HKV, 0.5, 300)
    assert saved["metric"] == "gap_std"
    bits = saved["head_bits"]
    assert len(bits) == L * HKV and all(sorted(bits[i * HKV:(i + 1) * HKV]) == [2, 4] for i in range(L))
    # Each layer's 2-bit head is its lowest-priority one.
    p = saved["priority"]
    assert all(bits[i * HKV + min(range(HKV), key=lambda h: (p[i * HKV + h], h))] == 2 for i in range(L))
    assert model.config._attn_implementation == "sdpa"  # calibration left the model as it was
    hf.patch(model, hf.TurboConfig(head_bits=str(path), fraction_2bit=0.5))
    out = generate(model, tokens(60), 4)
    assert cache_of(out).head_bits == bits
    default = cache_of(generate(hf.patch(llama()), tokens(60), 4))
    assert default.head_bits == [4] * (L * HKV)
    assert cache_of(out).memory()["bytes_per_token"] < default.memory()["bytes_per_token"]
    assert cache_of(out).memory()["bytes_per_token"] == sum(page_bytes(bits[i * HKV:(i + 1) * HKV], D) for i in range(L)) / 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sensitivity_calibration_finds_a_head_the_model_ignores(tmp_path, dtype):
    # Layer 2's KV head 1 feeds query heads 4-7; with their o_proj columns zeroed the model ignores that
    # head, so storing it at 2 bits changes nothing: its sensitivity is exactly 0, the lowest of all, and
    # over the whole model it is among the round(0.25 * L * HKV) = 2 heads at 2 bits.
    model = llama(dtype=dtype)
    group = HQ // HKV
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight[:, 1 * group * D:2 * group * D] = 0
    progress = []
    data = hf.calibrate(model, tokens(150, rows=2), 0.25, str(tmp_path / "s.json"),
                        progress=lambda done, total: progress.append((done, total)))
    p, bits = data["priority"], data["head_bits"]
    assert data["metric"] == "sensitivity" and progress[-1] == (L * HKV, L * HKV) and len(progress) == L * HKV
    ignored = 2 * HKV + 1
    assert p[ignored] == 0.0 and all(x > 0 and math.isfinite(x) for i, x in enumerate(p) if i != ignored)
    assert bits.count(2) == 2 and bits[ignored] == 2
    assert all(p[i] <= p[j] for i in range(L * HKV) for j in range(L * HKV) if bits[i] == 2 and bits[j] == 4)
    assert model.config._attn_implementation == "sdpa"  # calibration left the model as it was
    # The bits load as a calibration file; the cache takes different mixes in different layers.
    hf.patch(model, hf.TurboConfig(head_bits=str(tmp_path / "s.json"), fraction_2bit=0.25))
    assert cache_of(generate(model, tokens(70), 2)).head_bits == bits
    with pytest.raises(ValueError, match="metric 'kl'"):
        hf.calibrate(model, tokens(20), 0.5, None, metric="kl")


def test_calibration_from_a_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    words = "the of and a to in is was for on that with by as at from science history kitchen".split()
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)},
                                                           unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok)
    text = " ".join(words * 8)
    data = hf.calibrate(llama(), tokenizer, 1.0, str(tmp_path / "b.json"), text=text)
    assert data["tokens"] == len(words) * 8 and data["head_bits"] == [2] * (L * HKV)


def test_bad_configuration_raises_clear_errors(tmp_path):
    model = llama()
    with pytest.raises(ValueError, match="bits: 3, expected 8, 4 or 2"):
        hf.patch(model, hf.TurboConfig(bits=3))
    with pytest.raises(ValueError, match="fraction_2bit: 1.5"):
        hf.patch(model, hf.TurboConfig(fraction_2bit=1.5))
    with pytest.raises(ValueError, match="needs per-head priorities: run turboattn.hf.calibrate"):
        hf.patch(model, hf.TurboConfig(fraction_2bit=0.5))
    with pytest.raises(ValueError, match="head_bits: 3 values, expected num_layers \\* num_kv_heads"):
        hf.patch(model, hf.TurboConfig(head_bits=[4, 4, 4]))
    with pytest.raises(ValueError, match=r"head_bits\[1\] \(layer 0, head 1\): 3"):
        hf.patch(model, hf.TurboConfig(head_bits=[4, 3] + [4] * 6))
    with pytest.raises(ValueError, match="max_seqs: 0"):
        hf.patch(model, hf.TurboConfig(max_seqs=0))
    with pytest.raises(ValueError, match="prefill: 'fp8', expected 'flashq' or 'sdpa'"):
        hf.patch(model, hf.TurboConfig(prefill="fp8"))
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"model": "x", "num_layers": 2, "num_kv_heads": 2, "fraction_2bit": 0.5,
                                 "head_bits": [2, 4, 2, 4]}))
    with pytest.raises(ValueError, match="made for 2 layers x 2 KV heads"):
        hf.patch(model, hf.TurboConfig(head_bits=str(other)))
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(ValueError, match="not a turboattn calibration file"):
        hf.patch(model, hf.TurboConfig(head_bits=str(tmp_path / "junk.json")))
    assert model.config._attn_implementation == "sdpa"  # nothing was patched by the failed calls
    with pytest.raises(turboattn.Unsupported, match="head dim 80"):
        hf.patch(llama(head_dim=80))
    with pytest.raises(ValueError, match="calibrate: fraction_2bit"):
        hf.calibrate(model, tokens(10), -0.1, str(tmp_path / "x.json"))


def test_unsupported_uses_raise_instead_of_computing_wrong_results():
    model = llama()
    with pytest.raises(RuntimeError, match="call turboattn.hf.patch"):  # the cache alone would drop the context
        model.generate(tokens(10), past_key_values=hf.make_cache(model), max_new_tokens=2)
    hf.patch(model)
    with pytest.raises(turboattn.Unsupported, match="beam_search is not supported"):
        model.generate(tokens(10), num_beams=2, max_new_tokens=2)
    with pytest.raises(turboattn.InvalidArgument, match="max_seqs=1"):
        model.generate(tokens(10, rows=2), past_key_values=hf.make_cache(model, batch_size=1), max_new_tokens=2)
    with pytest.raises(turboattn.OutOfCapacity, match="over max_seq_len 64"):
        model.generate(tokens(60), past_key_values=hf.make_cache(model, max_seq_len=64), max_new_tokens=10,
                       eos_token_id=None)
    with pytest.raises(turboattn.Unsupported, match="static cache's empty slots"), torch.no_grad():
        model(tokens(20), past_key_values=transformers.StaticCache(config=model.config, max_cache_len=64))
    with pytest.warns(UserWarning, match="cache_implementation='static' is replaced by a TurboCache"):
        out = model.generate(tokens(20), max_new_tokens=2, cache_implementation="static", return_dict_in_generate=True)
    assert isinstance(cache_of(out), hf.TurboCache)
    hf.unpatch(model)
    assert model.config._attn_implementation == "sdpa"
    assert type(cache_of(model.generate(tokens(10), max_new_tokens=2, return_dict_in_generate=True))).__name__ == "DynamicCache"


def family_models():
    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0)
    T = transformers
    return {
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(**common)),  # biases on q, k, v
        "mistral": lambda: T.MistralForCausalLM(T.MistralConfig(**common, sliding_window=None)),
        "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(**dict(common, hidden_size=384), sliding_window=None,
                                                       eos_token_id=None, bos_token_id=None)),  # head dim 96
        "gemma": lambda: T.GemmaForCausalLM(T.GemmaConfig(**common, head_dim=256)),
        "gemma3": lambda: unit_norms(T.Gemma3ForCausalLM(T.Gemma3TextConfig(**common, head_dim=256,
                                                                             sliding_window=128))),
    }


def unit_norms(model):
    """Gemma's RMSNorms scale by 1 + weight: zero weights (transformers 5's random init; 4.x starts
    them at 1, doubling every norm, q/k norms included) keep the random model the same in every version."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.zero_()
    return model


@pytest.mark.parametrize("family", sorted(family_models()))
def test_model_families(family):
    torch.manual_seed(0)
    model = hf.patch(family_models()[family]().eval(), hf.TurboConfig(bits=8))
    if family == "qwen2":
        assert model.model.layers[0].self_attn.k_proj.bias is not None
    out = generate(model, tokens(60), 8)
    assert isinstance(cache_of(out), hf.TurboCache) and cache_of(out).lengths[0] == [67]
    ref = reference_logits(model, out.sequences, 60)
    assert step_cosines(out, ref).min().item() > 0.999


def test_sliding_window_and_softcapping_raise():
    T = transformers
    common = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=0)
    torch.manual_seed(0)
    model = hf.patch(T.MistralForCausalLM(T.MistralConfig(**common, sliding_window=48)).eval())
    assert generate(model, tokens(40), 8).sequences.shape[1] == 48  # within the window: the same attention
    with pytest.raises(turboattn.Unsupported, match="sliding window of 48 tokens and the sequence has reached 49"):
        generate(model, tokens(40), 10)
    with pytest.raises(turboattn.Unsupported, match="attn_logit_softcapping=50.0"):
        hf.patch(T.Gemma2ForCausalLM(T.Gemma2Config(**common, head_dim=256)))
    gemma2 = hf.patch(T.Gemma2ForCausalLM(T.Gemma2Config(**common, head_dim=256, attn_logit_softcapping=None,
                                                         sliding_window=4096)).eval(), hf.TurboConfig(bits=8))
    out = generate(gemma2, tokens(30), 4)
    assert step_cosines(out, reference_logits(gemma2, out.sequences, 30)).min().item() > 0.999


def test_calibration_file_sizes_the_cache_through_make_cache(tmp_path):
    model = llama()
    path = str(tmp_path / "bits.json")
    hf.calibrate(model, tokens(128), 0.5, path)
    cache = hf.make_cache(hf.patch(model), hf.TurboConfig(head_bits=path), batch_size=2, max_seq_len=200)
    assert cache.head_bits == hf.load_head_bits(path)["head_bits"]
    assert (cache.max_seqs, cache.max_seq_len, cache.num_pages) == (2, 200, 2 * (200 // 64 - 1))


def test_default_pages_hold_every_sequence_at_max_seq_len():
    # A sequence's first block has a region of its own, so max_seq_len // 64 - 1 pages per sequence is
    # exactly enough: two rows generated to 200 tokens take every page.
    model = hf.patch(llama(), hf.TurboConfig(bits=4))
    cache = hf.make_cache(model, batch_size=2, max_seq_len=200)
    assert cache.num_pages == 2 * (200 // 64 - 1)
    out = generate(model, tokens(150, rows=2), 51, past_key_values=cache)
    assert cache_of(out) is cache and cache.lengths[0] == [200, 200]
    assert cache.kv.free_pages() == 0


def test_a_dropped_cache_frees_its_kvcache_at_once():
    """No reference cycle between TurboCache and its layers: the KVCache (GPU memory on CUDA) goes when
    the last reference does, not at the garbage collector's next run."""
    import gc
    import weakref
    model = hf.patch(llama(), hf.TurboConfig(bits=4))
    out = generate(model, tokens(70), 3)
    kv = weakref.ref(cache_of(out).kv)
    gc.collect()
    gc.disable()
    try:
        del out
        assert kv() is None
    finally:
        gc.enable()


def test_cuda_graph_decoder_refuses_what_it_cannot_capture():
    model = hf.patch(llama(), hf.TurboConfig(bits=4))
    with pytest.raises(turboattn.InvalidArgument, match="takes a TurboCache"):
        hf.CudaGraphDecoder(model, object(), 8)
    cache = hf.make_cache(model, batch_size=1, max_seq_len=128)
    with pytest.raises(turboattn.Unsupported, match="on a CUDA device"):
        hf.CudaGraphDecoder(model, cache, 8)

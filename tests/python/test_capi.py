"""The Python bindings on the CPU (numpy arrays): results, memory figures and errors."""
import numpy as np
import pytest

import turboattn


def rel_l2(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture
def rng():
    return np.random.default_rng()  # fresh inputs every run


def qkv(rng, b, nq, nk, hq, hkv, d):
    return (rng.standard_normal((b, nq, hq, d)).astype(np.float16), rng.standard_normal((b, nk, hkv, d)).astype(np.float16),
            rng.standard_normal((b, nk, hkv, d)).astype(np.float16))


def test_version_and_cuda_flag():
    assert turboattn.version().count(".") == 2
    assert turboattn.cuda_available() in (True, False)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_attention_matches_exact(rng, causal, d):
    q, k, v = qkv(rng, 2, 100, 130, 4, 2, d)
    out, lse = turboattn.attention(q, k, v, causal=causal, return_lse=True)
    exact = turboattn.attention_exact(q, k, v, causal=causal)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    assert rel_l2(out, exact) < 0.02
    assert lse.shape == (2, 4, 100)


def test_variable_length_equals_per_sequence(rng):
    q, k, v = qkv(rng, 2, 70, 90, 2, 1, 64)
    batched = turboattn.attention(q, k, v, causal=True)
    cu_q, cu_k = np.array([0, 70, 140], np.int32), np.array([0, 90, 180], np.int32)
    packed = turboattn.attention(q.reshape(140, 2, 64), k.reshape(180, 1, 64), v.reshape(180, 1, 64), causal=True,
                                 cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    assert np.array_equal(packed.reshape(batched.shape), batched)


def test_bad_input_raises_with_the_argument_named(rng):
    q, k, v = qkv(rng, 1, 8, 8, 2, 2, 64)
    with pytest.raises(turboattn.InvalidArgument, match="k: dtype f32, expected f16"):
        turboattn.attention(q, k.astype(np.float32), v)
    q80 = rng.standard_normal((1, 8, 2, 80)).astype(np.float16)
    with pytest.raises(turboattn.Unsupported, match="head dim 80"):
        turboattn.attention(q80, q80, q80)
    with pytest.raises(turboattn.InvalidArgument, match="not a positive multiple"):
        turboattn.attention(rng.standard_normal((1, 8, 3, 64)).astype(np.float16), k, v)


def test_quantize_int8_within_half_a_step(rng):
    x = (rng.standard_normal((1, 130, 2, 64)) * 3).astype(np.float16)
    codes, scales = turboattn.quantize_int8(x)
    assert codes.dtype == np.int8 and scales.shape == (1, 2, 3)
    back = codes.astype(np.float32) * np.repeat(scales.transpose(0, 2, 1), 64, axis=1)[:, :130, :, None]
    assert np.all(np.abs(back - x.astype(np.float32)) <= 0.5 * np.repeat(scales.transpose(0, 2, 1), 64, axis=1)[:, :130, :, None] * 1.0001)


def test_cache_decode_and_memory(rng):
    hkv, hq, d, n = 2, 8, 128, 300
    cache = turboattn.KVCache(1, hkv, d, num_pages=16, max_seqs=2, max_seq_len=1024, head_bits=[8, 8])
    s = cache.add_sequence()
    k = rng.standard_normal((n, hkv, d)).astype(np.float16)
    v = rng.standard_normal((n, hkv, d)).astype(np.float16)
    cache.write(0, [s], k, v, np.array([0, n], np.int32))
    assert cache.length(0, s) == n
    q = rng.standard_normal((1, 1, hq, d)).astype(np.float16)
    out = cache.decode(0, [s], q)
    exact = turboattn.attention_exact(q, k[None], v[None], causal=True)
    assert rel_l2(out, exact) < 0.04
    mem = cache.memory()
    assert mem["fp16_bytes_per_token"] == hkv * d * 2 * 2
    assert mem["bytes_per_token"] == pytest.approx((128 + 2 * hkv * 64 * d) / 64)  # 8-bit pages: a 128-byte header


def test_append_decode_is_append_then_decode(rng):
    hkv, hq, d = 2, 4, 64
    caches = [turboattn.KVCache(1, hkv, d, num_pages=8, max_seqs=2, max_seq_len=400) for _ in range(2)]
    lens = [127, 40]  # the first sequence's block fills at the first step
    for c in caches:
        seqs = [c.add_sequence() for _ in lens]
    k = rng.standard_normal((sum(lens), hkv, d)).astype(np.float16)
    for c in caches:
        c.write(0, seqs, k, k[::-1].copy(), np.array([0, lens[0], sum(lens)], np.int32))
    for _ in range(3):
        kn, vn = (rng.standard_normal((2, hkv, d)).astype(np.float16) for _ in range(2))
        q = rng.standard_normal((2, 1, hq, d)).astype(np.float16)
        fused = caches[0].append_decode(0, seqs, kn, vn, q)
        caches[1].append(0, seqs, kn, vn)
        np.testing.assert_array_equal(fused, caches[1].decode(0, seqs, q))
    for s in seqs:
        for a, b in zip(caches[0].read(0, s), caches[1].read(0, s)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(turboattn.InvalidArgument, match="3 query heads"):  # refused before the append
        caches[0].append_decode(0, seqs, kn, vn, np.zeros((2, 1, 3, d), np.float16))
    assert [caches[0].length(0, s) for s in seqs] == [lens[0] + 3, lens[1] + 3]


def test_cache_out_of_pages(rng):
    cache = turboattn.KVCache(1, 1, 64, num_pages=1, max_seqs=1, max_seq_len=1000)
    s = cache.add_sequence()
    kv = rng.standard_normal((192, 1, 64)).astype(np.float16)  # blocks 1 and 2 need pages (the first needs none)
    with pytest.raises(turboattn.OutOfCapacity, match="new pages"):
        cache.write(0, [s], kv, kv, np.array([0, 192], np.int32))
    assert cache.length(0, s) == 0  # nothing was written


def test_head_bits():
    assert turboattn.assign_head_bits([0.5, 2.0, 0.1, 1.0], 1, 4, 0.5) == [2, 4, 2, 4]
    with pytest.raises(turboattn.InvalidArgument, match="expected num_layers"):
        turboattn.assign_head_bits([1.0], 2, 4, 0.5)  # the C side would write 8 values
    with pytest.raises(turboattn.InvalidArgument, match="head_bits: 1 values"):
        turboattn.KVCache(1, 2, 64, num_pages=1, max_seqs=1, max_seq_len=64, head_bits=[4])

"""turboattn.hf on a CUDA device: generate() with the prefill kernel and the CUDA cache (decode kernel),
against the model's own SDPA attention and against the same model generating on the CPU through the
reference. Tiny random fp16 Llama models, as in test_hf.py; skipped without a GPU and a CUDA build."""
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import turboattn  # noqa: E402
import turboattn.hf as hf  # noqa: E402
from test_hf import L, cache_of, generate, llama, reference_logits, step_cosines, tokens  # noqa: E402

pytestmark = [pytest.mark.skipif(not (torch.cuda.is_available() and turboattn.cuda_available()),
                                 reason="needs a CUDA device and a CUDA build of libturboattn"),
              pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")]


def cuda_llama(**kw):
    return llama(dtype=torch.float16, **kw).cuda()


# Minimum cosine of each decode step's logits against the fp16 model's SDPA logits; the CPU thresholds of
# test_hf.py, whose models are fp32.
@pytest.mark.parametrize("bits,min_cos", [(8, 0.999), (4, 0.998), (2, 0.98)])
def test_generate_on_cuda_matches_the_sdpa_model(bits, min_cos):
    model = hf.patch(cuda_llama(), hf.TurboConfig(bits=bits))
    prompt = tokens(100).cuda()
    out = generate(model, prompt, 30)
    cache = cache_of(out)
    assert isinstance(cache, hf.TurboCache) and cache.cache_device.startswith("cuda")
    assert cache.kv.device.startswith("cuda") and cache.lengths == [[129]] * L
    ref = reference_logits(model, out.sequences, 100)
    cos = step_cosines(out, ref)
    assert cos.min().item() > min_cos, cos
    # Teeth: a different context gives logits far from these.
    other = out.sequences.clone()
    other[:, :60] = tokens(60, seed=7).cuda()
    with torch.no_grad():
        moved = model(other).logits[0, 99:-1].float()
    assert torch.nn.functional.cosine_similarity(moved, ref).mean().item() < 0.9


def test_cuda_generation_tracks_the_cpu_reference_path():
    """The same fp16 model and cache configuration on the GPU (kernels) and on the CPU (reference): the
    caches hold the same bytes (test_gpu_cache), so the logits differ only by kernel arithmetic."""
    cfg = hf.TurboConfig(bits=4)
    gpu = hf.patch(cuda_llama(), cfg)
    cpu = hf.patch(llama(dtype=torch.float16), cfg)
    prompt = tokens(90)
    out_gpu = generate(gpu, prompt.cuda(), 12)
    # Teacher-forced on the CPU with the GPU's tokens, so one flipped argmax cannot derail the comparison.
    cache = hf.make_cache(cpu, batch_size=1, max_seq_len=200)
    seq = out_gpu.sequences.cpu()
    with torch.no_grad():
        logits = [cpu(seq[:, :90], past_key_values=cache).logits[0, -1]]
        for i in range(90, seq.shape[1] - 1):
            logits.append(cpu(seq[:, i:i + 1], past_key_values=cache).logits[0, -1])
    got = torch.stack([s[0] for s in out_gpu.logits]).float().cpu()
    cos = torch.nn.functional.cosine_similarity(got, torch.stack(logits).float())
    assert cos.min().item() > 0.999, cos


@pytest.mark.parametrize("prefill", ["flashq", "sdpa"])
def test_left_padded_batch_on_cuda_matches_each_sequence_alone(prefill):
    model = hf.patch(cuda_llama(), hf.TurboConfig(bits=4, prefill=prefill))
    a, b = tokens(70, seed=2), tokens(45, seed=3)
    ids = torch.zeros(2, 70, dtype=torch.long)
    mask = torch.zeros(2, 70, dtype=torch.long)
    ids[0], mask[0] = a[0], 1
    ids[1, 25:], mask[1, 25:] = b[0], 1
    out = generate(model, ids.cuda(), 10, attention_mask=mask.cuda())
    assert cache_of(out).lengths[0] == [79, 54]
    for row, alone in ((0, a), (1, b)):
        single = generate(model, alone.cuda(), 10)
        cos = [torch.nn.functional.cosine_similarity(x[row:row + 1].float(), y.float()).item()
               for x, y in zip(out.logits, single.logits)]
        assert min(cos) > 0.999, cos


# 7 new tokens + the last generated one: one decode call with q_len 8; 30 + 1: launches of 8 query tokens.
@pytest.mark.parametrize("new,bits,min_cos", [(7, 8, 0.998), (30, 4, 0.997)])
def test_second_turn_on_cuda_decodes_the_new_tokens_over_the_cache(new, bits, min_cos):
    model = hf.patch(cuda_llama(), hf.TurboConfig(bits=bits))
    cache = hf.make_cache(model, batch_size=1, max_seq_len=300)
    first = model.generate(tokens(40).cuda(), past_key_values=cache, max_new_tokens=5, do_sample=False,
                           eos_token_id=None)
    more = torch.cat([first, tokens(new, seed=5).cuda()], 1)
    out = generate(model, more, 5, past_key_values=cache)
    assert cache.lengths[0] == [more.shape[1] + 4]
    ref = reference_logits(model, out.sequences, more.shape[1])
    assert step_cosines(out, ref).min().item() > min_cos


def test_decode_steps_queue_no_waiting_torch_op():
    """A decode step queues its work and returns, so the host can prepare the next while the GPU runs this
    one: no PyTorch operation in it synchronizes (the sync debug mode raises on any; the library's own
    waits, such as its decode workspace growing, are outside its view), over steps where a sequence's
    first block completes (token 64) and where its second does and takes a page (token 128)."""
    model = hf.patch(cuda_llama(), hf.TurboConfig(bits=4))
    cache = hf.make_cache(model, batch_size=2, max_seq_len=256)
    with torch.no_grad():
        tok = model(tokens(60, rows=2).cuda(), past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
        tok = model(tok, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(70):  # tokens 62-131
                tok = model(tok, past_key_values=cache).logits[:, -1].argmax(-1, keepdim=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    assert cache.lengths == [[131, 131]] * L
    with pytest.raises(RuntimeError, match="synchroniz"):  # teeth: the mode does catch a waiting op
        torch.cuda.set_sync_debug_mode("error")
        try:
            tok.sum().item()
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_cuda_graph_decoder_replays_the_eager_steps():
    """Decode steps replayed from a CUDA graph give the logits of the same steps run eagerly over a cache
    with the same reservation (so the same decode splits), teacher-forced, across the steps where a
    block completes (token 64) and where a page is taken (token 128); afterwards the cache holds what the
    eager one holds and continues eagerly."""
    model = hf.patch(cuda_llama(), hf.TurboConfig(bits=4))
    prompt, steps = tokens(60, rows=2).cuda(), 80
    eager, graphed = (hf.make_cache(model, batch_size=2, max_seq_len=256) for _ in range(2))
    with torch.no_grad():
        logits = model(prompt, past_key_values=eager).logits[:, -1]
        eager.kv.reserve(eager._seq_array, steps)
        fed, want = [], []
        for _ in range(steps):
            fed.append(logits.argmax(-1, keepdim=True))
            logits = model(fed[-1], past_key_values=eager).logits[:, -1]
            want.append(logits.float())
        model(prompt, past_key_values=graphed)
        decoder = hf.CudaGraphDecoder(model, graphed, steps)
        for i, tok in enumerate(fed):
            got = decoder.step(tok).float()
            torch.testing.assert_close(got, want[i], rtol=2e-3, atol=2e-3, msg=lambda m: f"step {i}: {m}")
        with pytest.raises(turboattn.OutOfCapacity, match="every step"):
            decoder.step(fed[-1])
        with pytest.raises(RuntimeError, match="close"):  # not closed: other uses of the cache are refused
            model(fed[-1], past_key_values=graphed)
        decoder.close()
        assert graphed.lengths == eager.lengths == [[60 + steps] * 2] * L
        for layer in (0, L - 1):
            for a, b in zip(graphed.kv.read(layer, graphed.seqs[1]), eager.kv.read(layer, eager.seqs[1])):
                assert torch.equal(a, b)
        tok = want[-1].argmax(-1, keepdim=True)
        torch.testing.assert_close(model(tok, past_key_values=graphed).logits.float(),
                                   model(tok, past_key_values=eager).logits.float(), rtol=2e-3, atol=2e-3)


def test_cuda_graph_decoder_refuses_padded_rows_and_guards_its_cache():
    model = hf.patch(cuda_llama(), hf.TurboConfig(bits=4))
    ids, mask = tokens(40, rows=2), torch.ones(2, 40, dtype=torch.long)
    mask[1, :5] = 0
    padded = hf.make_cache(model, batch_size=2, max_seq_len=128)
    with torch.no_grad():
        model(ids.cuda(), attention_mask=mask.cuda(), past_key_values=padded)
        with pytest.raises(turboattn.InvalidArgument, match="padded rows"):
            hf.CudaGraphDecoder(model, padded, 8)
        cache = hf.make_cache(model, batch_size=2, max_seq_len=128)
        logits = model(ids.cuda(), past_key_values=cache).logits[:, -1]
        decoder = hf.CudaGraphDecoder(model, cache, 8)
        with pytest.raises(turboattn.InvalidArgument, match="another one is open"):
            hf.CudaGraphDecoder(model, cache, 8)
        decoder.step(logits.argmax(-1, keepdim=True))
        with pytest.raises(RuntimeError, match="close"):
            cache.reset()
        decoder.close()
        decoder.close()  # once is enough; again does nothing
        assert cache.lengths == [[41, 41]] * L
        cache.reset()

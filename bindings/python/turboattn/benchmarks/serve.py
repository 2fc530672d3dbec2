"""Serving benchmark (issue 7): batched generation of a real model with a fixed GPU memory budget for the KV
cache, FP16 against turboattn's compressed cache, one run on one card.

Each configuration runs the same transformers model (SmolLM2-135M-Instruct by default, FP16 weights):
- fp16: transformers' DynamicCache with SDPA (what generate() uses by default; each step concatenates
  the new token onto every layer's cache, which copies the cache);
- fp16_prealloc: FP16 K and V in buffers allocated once for the whole generation (a transformers Cache
  written in place; SDPA reads views of it), the stronger FP16 baseline: a step reads the cache once;
- kv4: turboattn.hf (FlashQ + SAS prefill, decode over the cache) with every head at 4 bits;
- mix50: the same with half the model's KV heads at 2 bits, the least sensitive (hf.calibrate);
- kv4_sdpa_prefill, mix50_sdpa_prefill (not run by default): the same caches with the prompt's attention
  through PyTorch's SDPA (TurboConfig(prefill="sdpa")): the compressed cache's gain without FlashQ's
  prefill kernel;
- kv4_graphs, mix50_graphs (not run by default): kv4 and mix50 with the decode steps replayed from a CUDA
  graph (hf.CudaGraphDecoder; the prefill and the first step eager): what a step costs without the
  host's Python;
- fp16_graphs (not run by default): their FP16 counterpart, the baseline with CUDA graphs. Neither
  transformers' dynamic cache nor SDPA over views of a growing cache can be captured, so this one
  keeps K and V in buffers allocated once (as fp16_prealloc) written at a position held on the GPU,
  and each decode step attends over the whole buffer with a mask of the written positions (SDPA's
  memory-efficient backend, each KV head's query heads as its query rows: no copies for GQA), as a
  static cache does; its prefill is SDPA's causal attention over the prompt, as fp16's;
- fp16_sdpa_auto (not run by default): fp16 with SDPA's own backend choice in decode steps as well.
The FP16 configurations' decode steps run SDPA's FlashAttention-2 backend: left to choose, PyTorch picks
cuDNN on Hopper, whose execution plan is built anew for every new KV length, host work in every layer of
every step (fp16_sdpa_auto measures it). Their prefill keeps SDPA's choice.

For each prompt length the largest batch whose KV cache fits the budget is worked out (FP16: 2 x layers
x KV heads x head dim x 2 bytes per token; turboattn: its pages and each sequence's fixed parts, as the
library allocates them), and batches up to it run: one forward over the whole batch's prompts (the
prefill: real text, a different window per row), then one-token steps, greedy, until gen_len tokens
per row: eager, or replayed from a CUDA graph in the *_graphs configurations (FP16 and turboattn
alike). Reported per run:
tokens per second (batch x gen_len over prefill + decode), time to first token (the batch's prefill and
its first token), per-token latency (mean decode step), peak memory, and at each largest batch the share
of a decode step spent in attention (its kernels' time under the PyTorch profiler, cache writes
included, over the step's time); every run also gives the host time spent inside the attention function
and the cache's update per step, and the part of it inside turboattn's library calls (the steps here
are bound by the host). A long-context row: 32k tokens at batch 1 and at the largest batch.

    turboattn bench serve [--out serve.json] [--quick] [--budget-gib 12]
    PYTHONPATH=bindings/python python bench/serve.py [--out bench/results/serve.json]
(TURBOATTN_DATA holds the model and text when there is no network; --device cpu with --model tiny runs
a random two-layer model as a smoke test of the script: its times mean nothing.)
"""
import argparse
import contextlib
import datetime
import gc
import json
import os
import time

import torch
import transformers
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

import turboattn
from turboattn import hf
from turboattn.benchmarks import commit
from turboattn._progress import Progress

CONFIGS = ("fp16", "fp16_prealloc", "kv4", "mix50", "fp16_sdpa_auto", "kv4_sdpa_prefill", "mix50_sdpa_prefill",
           "kv4_graphs", "mix50_graphs", "fp16_graphs")
DEFAULT_CONFIGS = ("fp16", "fp16_prealloc", "kv4", "mix50")
FP16_CONFIGS = ("fp16", "fp16_prealloc", "fp16_sdpa_auto", "fp16_graphs")
SDPA_PREFILL = "_sdpa_prefill"  # a turboattn configuration's suffix: its prefill through SDPA
GRAPHS = "_graphs"  # a configuration's suffix: its decode steps replayed from a CUDA graph
STATIC_ATTENTION = "bench_serve_static"  # fp16_graphs' attention function
PROMPTS = (1024, 2048, 4096, 8192)
LONG_PROMPT = 32768
GEN_LEN = 256
PROFILE_STEPS = 3  # decode steps after the timed ones, under the profiler (attention's share)
ATTENTION_RANGE = "bench_serve::attention"  # a profiler range; not named like the library's kernels
LIBRARY_KERNELS = "turboattn::cuda::"  # the namespace in every turboattn kernel's name
# In graph replays no profiler range runs: fp16_graphs' attention is told by its kernels' names (SDPA's
# memory-efficient kernels; its cache writes, index_copy, are not counted).
SDPA_EFFICIENT_KERNELS = "fmha"
GIB = 1 << 30


def error_string(e):
    return f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]


# ---- the FP16 cache allocated once ----

class _PreallocatedLayer(CacheLayerMixin):
    """One layer's K and V [B, Hkv, max_len, D], written in place; update returns views of the filled part."""

    is_compileable = False
    is_sliding = False

    def __init__(self, batch, heads, max_len, dim, dtype, device):
        super().__init__()
        self.k = torch.empty(batch, heads, max_len, dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.keys = self.values = None
        self.seen = 0

    def lazy_initialization(self, key_states, value_states):
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        n = key_states.shape[-2]
        if self.seen + n > self.k.shape[2]:
            raise RuntimeError(f"preallocated cache: {self.seen} + {n} tokens exceed its {self.k.shape[2]}")
        self.k[:, :, self.seen:self.seen + n].copy_(key_states)
        self.v[:, :, self.seen:self.seen + n].copy_(value_states)
        self.seen += n
        return self.k[:, :, :self.seen], self.v[:, :, :self.seen]

    def get_mask_sizes(self, query_length, *args, **kwargs):
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.seen + query_length, 0

    def get_seq_length(self, *args, **kwargs):
        return self.seen

    def get_max_length(self):
        return self.k.shape[2]

    def get_max_cache_shape(self):
        return self.k.shape[2]

    def reset(self):
        self.seen = 0


class PreallocatedCache(Cache):
    """FP16 (the model's dtype) K and V of a batch, every layer allocated for max_len tokens up front."""

    def __init__(self, shape, batch, max_len, dtype, device):
        layers, heads, dim = shape
        super().__init__(layers=[_PreallocatedLayer(batch, heads, max_len, dim, dtype, device) for _ in range(layers)])

    @property
    def nbytes(self):
        return sum(2 * layer.k.numel() * layer.k.element_size() for layer in self.layers)


# ---- the FP16 cache of fixed shape, for decode steps in a CUDA graph ----

class _StaticLayer(_PreallocatedLayer):
    """A _PreallocatedLayer whose decode steps write at the owner's position on the GPU and hand attention
    the whole buffers (fixed shapes and addresses, so a step can be captured); the prompt is written and
    attended as fp16_prealloc's. Zeroed: the masked slots must hold finite values."""

    def __init__(self, owner, *args):
        super().__init__(*args)
        self.k.zero_(), self.v.zero_()
        self.owner = owner

    def update(self, key_states, value_states, *args, **kwargs):
        if key_states.shape[-2] > 1 or self.seen == 0:
            super().update(key_states, value_states)
            return key_states, value_states
        self.owner.written(self)
        self.k.index_copy_(2, self.owner.position, key_states)
        self.v.index_copy_(2, self.owner.position, value_states)
        return self.k, self.v


class StaticCache(Cache):
    """fp16_graphs' cache: _StaticLayers sharing the decode step's position (int64 [1] on the GPU, set by
    StaticGraphDecoder before each step) and the mask of written slots [1, 1, 1, max_len] that layer 0's
    update derives from it."""

    def __init__(self, shape, batch, max_len, dtype, device):
        layers, heads, dim = shape
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)
        self.valid = torch.zeros(1, 1, 1, max_len, dtype=torch.bool, device=device)
        super().__init__(layers=[_StaticLayer(self, batch, heads, max_len, dim, dtype, device) for _ in range(layers)])

    def written(self, layer):
        if layer is self.layers[0]:
            torch.le(self.slots, self.position, out=self.valid[0, 0, 0])

    @property
    def nbytes(self):
        return sum(2 * layer.k.numel() * layer.k.element_size() for layer in self.layers)


def static_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """fp16_graphs' attention function. query [B, Hq, N, D]; key, value the prompt's [B, Hkv, N, D]
    (causal SDPA) or a decode step's whole buffers [B, Hkv, max_len, D], attended with the cache's mask
    and each KV head's query heads as its query rows."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    B, hq, n, D = query.shape
    hkv = key.shape[1]
    if n > 1:
        return sdpa(query, key, value, is_causal=True, scale=scaling, enable_gqa=hq != hkv).transpose(1, 2), None
    cache = StaticGraphDecoder.current.cache
    out = sdpa(query.reshape(B, hkv, hq // hkv, D), key, value, attn_mask=cache.valid, scale=scaling)
    return out.reshape(B, hq, 1, D).transpose(1, 2), None


def _no_mask(*args, **kwargs):
    return None  # static_attention makes its own


class StaticGraphDecoder:
    """fp16_graphs' decode steps: the first eager (it warms up and captures), then one replay each, with
    the new tokens and their position copied into the graph's inputs."""

    current = None  # the decoder whose cache static_attention reads

    def __init__(self, model, cache, cache_kwarg, position):
        self.model, self.cache, self.next_position = model, cache, position
        self.ids = torch.zeros(cache.layers[0].k.shape[0], 1, dtype=torch.long, device=cache.position.device)
        self.kw = {cache_kwarg: cache, "use_cache": True, "logits_to_keep": 1,
                   "position_ids": cache.position.view(1, 1)}
        self.graph = self.logits = None
        StaticGraphDecoder.current = self

    def _forward(self):
        return self.model(input_ids=self.ids, **self.kw).logits[:, -1]

    def step(self, x):
        self.ids.copy_(x)
        self.cache.position.fill_(self.next_position)
        self.next_position += 1
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        logits = self._forward()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._forward()
        return logits


# ---- memory ----

def model_shape(model):
    """(layers, KV heads, head dim) of this process's cache: the model's, or under tensor parallelism its
    rank's heads; checked against what turboattn supports."""
    return hf._rank_shape(model)[:3]


def turbo_cache_bytes(shape, head_bits, batch, max_len):
    """Bytes a turboattn KVCache for `batch` sequences of max_len tokens allocates: its page pool and per
    sequence its INT8 buffers, first blocks and K means (per layer and KV head)."""
    layers, heads, dim = shape
    probe = turboattn.KVCache(layers, heads, dim, num_pages=1, max_seqs=1, max_seq_len=max_len, head_bits=head_bits)
    return hf.cache_pages(batch, max_len) * probe.memory()["page_bytes_total"] + batch * probe.sequence_fixed_bytes()


def largest_batch(config, shape, head_bits, max_len, budget):
    """The largest batch whose KV cache of max_len tokens per sequence fits `budget` bytes (0: none)."""
    if config in FP16_CONFIGS:
        return int(budget // (turboattn.dense_kv_bytes_per_token(*shape) * max_len))
    per_seq = turbo_cache_bytes(shape, head_bits, 1, max_len)
    return int(budget // per_seq)


def largest_context(config, shape, head_bits, budget, gen_len, step=64):
    """The longest prompt (a multiple of `step` tokens) whose sequence of prompt + gen_len tokens fits
    the budget at batch 1."""
    lo, hi = 0, 1 << 24  # in steps
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if largest_batch(config, shape, head_bits, step * mid + gen_len + PROFILE_STEPS, budget) >= 1:
            lo = mid
        else:
            hi = mid - 1
    return step * lo


def sweep_batches(largest):
    """The smaller batches of a prompt length's sweep, beside its largest: a half, a quarter, a sixteenth."""
    return sorted({max(1, largest // d) for d in (2, 4, 16)} - {largest}, reverse=True) if largest > 1 else []


class DeviceMemory:
    """Memory of a run: PyTorch's peak allocation plus what the turboattn library allocated itself
    (cudaMalloc, outside PyTorch's allocator: the cache and its decode workspace), from the device's free
    memory less PyTorch's reserved growth."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")
        if self.cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.used0, self.reserved0 = self._used(), torch.cuda.memory_reserved()

    @staticmethod
    def _used():
        free, total = torch.cuda.mem_get_info()
        return total - free

    def outside_torch(self):
        if not self.cuda:
            return 0
        torch.cuda.synchronize()
        return max(0, (self._used() - self.used0) - (torch.cuda.memory_reserved() - self.reserved0))

    def peak(self):
        return torch.cuda.max_memory_allocated() + self.outside_torch() if self.cuda else None


# ---- one run ----

class Configs:
    """The model switched to each configuration's attention, and its caches."""

    def __init__(self, model, mix_bits):
        self.model, self.mix_bits = model, mix_bits
        self.shape = model_shape(model)
        self.model_kv_heads = hf._shape(model)[1]
        self.rank, self.ranks, _ = hf._tensor_parallel(model)
        self.cache_kwarg = hf._cache_kwarg(model)

    def head_bits(self, config):
        """Bits of all the model's KV heads in a turboattn configuration (None: FP16)."""
        base = config.removesuffix(SDPA_PREFILL).removesuffix(GRAPHS)
        return {"kv4": [4] * (self.shape[0] * self.model_kv_heads), "mix50": self.mix_bits}.get(base)

    def turbo_config(self, config):
        prefill = "sdpa" if config.endswith(SDPA_PREFILL) else "flashq"
        return hf.TurboConfig(head_bits=self.head_bits(config), prefill=prefill)

    def cache_bits(self, config):
        """Bits of this process's cache (under tensor parallelism its rank's heads): what its size follows."""
        bits = self.head_bits(config)
        return bits and hf._rank_head_bits(bits, self.shape[0], self.model_kv_heads, self.rank, self.ranks)

    @staticmethod
    def decode_context(config):
        """What the decode steps run under: FlashAttention-2 for the FP16 configurations (module docstring),
        the memory-efficient backend for fp16_graphs' masked steps."""
        if config == "fp16_graphs":
            return sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION])
        if config in FP16_CONFIGS and config != "fp16_sdpa_auto":
            return sdpa_kernel([SDPBackend.FLASH_ATTENTION])
        return contextlib.nullcontext()

    def use(self, config):
        if config == "fp16_graphs":
            hf.unpatch(self.model)
            AttentionInterface.register(STATIC_ATTENTION, static_attention)
            AttentionMaskInterface.register(STATIC_ATTENTION, _no_mask)
            self.model.set_attn_implementation(STATIC_ATTENTION)
        elif config in FP16_CONFIGS:
            hf.unpatch(self.model)
            self.model.set_attn_implementation("sdpa")
        else:
            hf.patch(self.model, self.turbo_config(config))

    def cache(self, config, batch, max_len, memory):
        """(cache, its bytes as allocated: None for the DynamicCache, which grows)."""
        if config in ("fp16", "fp16_sdpa_auto"):
            try:
                return DynamicCache(config=self.model.config), None
            except TypeError:  # transformers without the config argument
                return DynamicCache(), None
        if config in ("fp16_prealloc", "fp16_graphs"):
            kind = StaticCache if config == "fp16_graphs" else PreallocatedCache
            c = kind(self.shape, batch, max_len, self.model.dtype, self.model.device)
            return c, c.nbytes
        cache = hf.TurboCache(self.model, self.turbo_config(config), max_seqs=batch, max_seq_len=max_len,
                              num_pages=hf.cache_pages(batch, max_len))
        return cache, (memory.outside_torch() if memory.cuda
                       else turbo_cache_bytes(self.shape, self.cache_bits(config), batch, max_len))


class StepClock:
    """Device-side times: a CUDA event per mark (read after the run, so no step waits for the host), or
    perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = str(device).startswith("cuda")
        self.marks = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def ms(self, i, j):
        if self.cuda:
            return self.marks[i].elapsed_time(self.marks[j])
        return (self.marks[j] - self.marks[i]) * 1e3


@contextlib.contextmanager
def attention_wrapped(cache, attn_impl, wrap):
    """Replaces the model's attention function and the cache's update (the FP16 caches' writes; turboattn's
    happen in its attention function) by wrap(function), for the steps run inside."""
    original = ALL_ATTENTION_FUNCTIONS[attn_impl]
    AttentionInterface.register(attn_impl, wrap(original))
    cache.update = wrap(cache.update)
    try:
        yield
    finally:
        AttentionInterface.register(attn_impl, original)
        del cache.update


def annotated(fn):
    """fn inside a profiler range (ATTENTION_RANGE)."""
    def call(*args, **kwargs):
        with torch.profiler.record_function(ATTENTION_RANGE):
            return fn(*args, **kwargs)
    return call


class HostClock:
    """Host time spent inside the functions it wraps (wrap), summed, and each call's (calls): where a step's
    host time goes. It costs each call two perf_counter reads, on every configuration alike."""

    def __init__(self):
        self.seconds = 0.0
        self.calls = []

    def wrap(self, fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - t0
                self.seconds += took
                self.calls.append(took)
        return call


class _TimedLibrary:
    """turboattn's library (turboattn.lib) with every function it hands out wrapped by `wrap`."""

    def __init__(self, library, wrap):
        self._library, self._wrap, self._wrapped = library, wrap, {}

    def __getattr__(self, name):
        fn = self._wrapped.get(name)
        if fn is None:
            fn = self._wrapped[name] = self._wrap(getattr(self._library, name))
        return fn


@contextlib.contextmanager
def library_timed(clock):
    """Routes turboattn's library calls through clock.wrap for the steps run inside: the host time of the
    library itself (its checks, bookkeeping and launches), apart from the Python around it."""
    real = turboattn.lib
    turboattn.lib = _TimedLibrary(real, clock.wrap)
    try:
        yield
    finally:
        turboattn.lib = real


def attention_implementation(config):
    """The transformers attention function a configuration's model runs."""
    if config == "fp16_graphs":
        return STATIC_ATTENTION
    return "sdpa" if config in FP16_CONFIGS else hf.ATTN_IMPLEMENTATION


def _subtree_kernels(event):
    kernels = list(event.kernels)
    for child in event.cpu_children:
        kernels += _subtree_kernels(child)
    return kernels


def attention_and_busy_ms(prof, named=None):
    """(attention's kernel time, all kernels' time) in ms over the profiled steps. Attention: the kernels
    PyTorch ops launched inside the ATTENTION_RANGE ranges, every turboattn kernel (the library
    launches them itself, so the profiler ties them to no range; only the attention function runs them),
    and every kernel whose name contains `named` (graph replays, where no range runs).
    The profiler also lists each range as a GPU-side annotation spanning its kernels (and the gaps between
    them): those are not kernels and are left out of both sums."""
    cpu = torch.autograd.DeviceType.CPU
    events = prof.events()
    ranged = [k for e in events if e.name == ATTENTION_RANGE and e.device_type == cpu for k in _subtree_kernels(e)]
    kernels = [e for e in events if e.device_type != cpu and not getattr(e, "is_user_annotation", False)
               and e.name != ATTENTION_RANGE]
    ours = sum(e.device_time_total for e in kernels if LIBRARY_KERNELS in e.name or (named and named in e.name))
    attention = sum(k.duration for k in ranged if LIBRARY_KERNELS not in k.name) + ours
    return attention / 1e3, sum(e.device_time_total for e in kernels) / 1e3


@torch.no_grad()
def generate(configs, config, ids, gen_len, *, profile=False):
    """One batched generation: the prompts' prefill, then gen_len - 1 one-token steps, greedy. Returns
    (tokens [B, gen_len], measurements)."""
    model = configs.model
    device = ids.device
    batch, prompt = ids.shape
    max_len = prompt + gen_len + PROFILE_STEPS
    memory = DeviceMemory(device)
    cache, cache_bytes = configs.cache(config, batch, max_len, memory)
    kw = {configs.cache_kwarg: cache, "use_cache": True, "logits_to_keep": 1}

    def step(x):
        return model(input_ids=x, **kw).logits[:, -1].argmax(-1, keepdim=True)

    clock, host, library = StepClock(device), HostClock(), HostClock()
    clock.mark()
    tokens = [step(ids)]
    clock.mark()
    if clock.cuda:
        # Wait for the prefill and its first token, as a server returning that token does. Without it the
        # host queues past the prefill, and its first decode step may block until the prefill's GPU work
        # drains (seconds at 32k) inside whichever call finds the launch queue full: the host clocks below
        # would count that wait.
        torch.cuda.synchronize()
    decoder, decode_step = None, step
    if config.endswith(GRAPHS):  # the first decode step runs eagerly and captures; it is timed with the rest
        if config == "fp16_graphs":
            decoder = StaticGraphDecoder(model, cache, configs.cache_kwarg, prompt)
        else:
            decoder = hf.CudaGraphDecoder(model, cache, gen_len - 1 + PROFILE_STEPS)

        def decode_step(x):
            return decoder.step(x).argmax(-1, keepdim=True)
    with configs.decode_context(config), attention_wrapped(cache, attention_implementation(config), host.wrap), \
            library_timed(library):
        for _ in range(gen_len - 1):
            tokens.append(decode_step(tokens[-1]))
            clock.mark()
    if clock.cuda:
        torch.cuda.synchronize()
    prefill_ms = clock.ms(0, 1)
    total_ms = clock.ms(0, len(clock.marks) - 1)
    decode_ms = clock.ms(1, len(clock.marks) - 1)
    steps = gen_len - 1
    result = {
        "ttft_ms": prefill_ms,
        "per_token_ms": decode_ms / steps if steps else None,
        "tokens_per_s": batch * gen_len / (total_ms / 1e3),
        "decode_tokens_per_s": batch * steps / (decode_ms / 1e3) if steps else None,
        # Host time inside the attention function and the cache's update per decode step (turboattn: its
        # library calls, their checks and launches), of the step's per_token_ms.
        "attention_host_ms_per_step": host.seconds * 1e3 / steps if steps else None,
        # The part of it inside turboattn's library calls (0 for the FP16 configurations).
        "library_host_ms_per_step": library.seconds * 1e3 / steps if steps else None,
        "kv_cache_gib": (cache_bytes if cache_bytes is not None else batch * (prompt + gen_len) *
                         turboattn.dense_kv_bytes_per_token(*configs.shape)) / GIB,
    }
    if profile:
        with configs.decode_context(config):
            result.update(attention_share(configs, config, cache, decode_step, tokens[-1], result["per_token_ms"]))
    if isinstance(decoder, hf.CudaGraphDecoder):
        decoder.close()
    StaticGraphDecoder.current = None
    peak = memory.peak()
    result["peak_mem_gib"] = peak / GIB if peak is not None else None
    return torch.cat(tokens, dim=1), result


def attention_share(configs, config, cache, step, last, per_token_ms):
    """Attention's device time per decode step (PROFILE_STEPS more steps under the profiler) and its share
    of the timed steps' mean time. Profiling failures are reported, not raised."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available() and last.is_cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    try:
        with attention_wrapped(cache, attention_implementation(config), annotated), \
                torch.profiler.profile(activities=activities) as prof:
            for _ in range(PROFILE_STEPS):
                last = step(last)
            if last.is_cuda:
                torch.cuda.synchronize()
        named = SDPA_EFFICIENT_KERNELS if config == "fp16_graphs" else None
        attn, busy = (x / PROFILE_STEPS for x in attention_and_busy_ms(prof, named))
    except Exception as e:  # noqa: BLE001 - the run's other numbers stand without it
        return {"attention_ms_per_step": None, "attention_share": None, "profile_error": error_string(e)}
    if not busy:  # no device kernels (CPU)
        return {"attention_ms_per_step": None, "attention_share": None, "profile_error": None}
    # Shares of the timed steps' mean time: what is left beyond the kernels is the host (Python, launches).
    return {"attention_ms_per_step": attn, "gpu_busy_ms_per_step": busy,
            "attention_share": attn / per_token_ms if per_token_ms else None, "profile_error": None}


# ---- inputs ----

def text_tokens(tokenizer, needed):
    """Token ids of real text (the Jane Austen corpus of the accuracy evaluation), at least `needed`
    long (repeated when the text is shorter)."""
    from turboattn.evaluation import corpus
    novels = corpus.austen_novels()
    ids = tokenizer(corpus.text_of(tuple(novels), novels))["input_ids"]
    reps = -(-needed // len(ids))
    return torch.tensor(ids * reps, dtype=torch.long)


def prompts(tokens, batch, length, device):
    """[batch, length]: row r is a window of the text starting r * length / 7 tokens further than row r - 1."""
    stride = max(1, length // 7)
    n = tokens.numel() - length
    starts = [(r * stride) % max(1, n) for r in range(batch)]
    return torch.stack([tokens[s:s + length] for s in starts]).to(device)


def tiny_model(device):
    """A random two-layer Llama (9 query heads over 3 KV heads, head dim 64, 512 tokens) for smoke tests."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=576, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=1 << 16,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(device).eval()


def load(name, device):
    """(model, tokens of text to cut prompts from, calibration ids, model description)."""
    if name == "tiny":
        model = tiny_model(device)
        g = torch.Generator().manual_seed(1)
        tokens = torch.randint(0, model.config.vocab_size, (1 << 16,), generator=g)
        return model, tokens, tokens[:256][None], "random 2-layer Llama (smoke test)"
    from turboattn.evaluation import corpus, models
    model, tokenizer = models.load(name, device, dtype=torch.float16 if str(device).startswith("cuda") else None)
    calib = tokenizer(corpus.text_of(corpus.CALIBRATION))["input_ids"][:2048]
    tokens = text_tokens(tokenizer, 1 << 16)
    return model, tokens, torch.tensor([calib]), models.MODELS.get(name, (None, None, name))[2]


def mixed_bits(model, calib_ids, fraction=0.5):
    """Half the model's KV heads at 2 bits: the least sensitive (hf.calibrate's measured KL)."""
    data = hf.calibrate(model, calib_ids.to(model.device), fraction, None, metric="sensitivity")
    return data["head_bits"]


# ---- the benchmark ----

def run_row(configs, tokens, prompt, config, batch, largest, profile, gen_len, device):
    row = {"config": config, "batch": batch, "prompt_len": prompt, "gen_len": gen_len, "largest_batch": largest,
           "tokens_per_s": None, "peak_mem_gib": None, "error": None}
    try:
        configs.use(config)
        _, measured = generate(configs, config, prompts(tokens, batch, prompt, device), gen_len, profile=profile)
        row.update(measured)
    except (torch.cuda.OutOfMemoryError, RuntimeError, MemoryError) as e:  # turboattn's errors too
        row["error"] = error_string(e)
    return row


def build_plan(configs, names, prompt_lens, gen_len, budget, quick, long_prompt):
    """[(prompt_len, config, batch, largest, profile)] in the order they run, most telling first (a run cut
    short by --time-limit keeps those): each prompt length's largest batch, the long-context rows, then
    the smaller batches of the sweep (--quick: none)."""
    largest = {}
    for prompt in list(prompt_lens) + ([long_prompt] if long_prompt else []):
        for config in names:
            largest[prompt, config] = largest_batch(config, configs.shape, configs.cache_bits(config),
                                                    prompt + gen_len + PROFILE_STEPS, budget)
    plan = [(n, c, largest[n, c], largest[n, c], True) for n in prompt_lens for c in names if largest[n, c] >= 1]
    if long_prompt:
        plan += [(long_prompt, c, b, largest[long_prompt, c], b == largest[long_prompt, c])
                 for c in names for b in sorted({1, largest[long_prompt, c]}) if 1 <= b <= largest[long_prompt, c]]
    if not quick:
        plan += [(n, c, b, largest[n, c], False) for n in prompt_lens for c in names for b in sweep_batches(largest[n, c])]
    return plan


def summarize(rows, names):
    """Per prompt length: each configuration's best tokens per second and its ratio to the best FP16 one."""
    out = {}
    for prompt in sorted({r["prompt_len"] for r in rows}):
        best = {}
        for name in names:
            ok = [r for r in rows if r["config"] == name and r["prompt_len"] == prompt and r["tokens_per_s"]]
            if ok:
                top = max(ok, key=lambda r: r["tokens_per_s"])
                best[name] = {"tokens_per_s": top["tokens_per_s"], "batch": top["batch"]}
        fp16 = max((best[n]["tokens_per_s"] for n in FP16_CONFIGS if n in best), default=None)
        for name, b in best.items():
            b["vs_fp16_best"] = b["tokens_per_s"] / fp16 if fp16 else None
        out[str(prompt)] = best
    return out


def _earlier_results(args, card):
    """The results file --append continues, refused (before the model loads) where its rows were measured
    otherwise than this call's will be."""
    try:
        with open(args.out) as f:
            earlier = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--append: cannot read {args.out} ({e}); write a new file instead")
    here = {"card": card, "commit": commit(), "budget_gib": args.budget_gib, "gen_len": args.gen_len,
            "torch": torch.__version__, "transformers": transformers.__version__}
    mismatch = [k for k, v in here.items() if earlier.get(k) != v]
    if (earlier.get("model") or {}).get("name") != args.model:
        mismatch.append("model")
    if mismatch:
        raise SystemExit(f"--append: {args.out} was written with another {', '.join(mismatch)}; write a new file "
                         "instead")
    if here["commit"] == "unknown":
        raise SystemExit(f"--append: the commit is unknown (set TURBOATTN_COMMIT), so {args.out}'s rows may be of "
                         "other code; write a new file instead")
    return earlier


def main(argv=None, *, prog=None, default_out="serve.json"):
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=default_out)
    ap.add_argument("--model", default="smollm2-135m", help="a turboattn.evaluation model key, directory, .gguf "
                    "file, or 'tiny' (random, for smoke tests)")
    ap.add_argument("--budget-gib", type=float, default=12.0, help="GPU memory for the KV cache (GiB)")
    ap.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=CONFIGS)
    ap.add_argument("--prompts", nargs="*", type=int, default=list(PROMPTS), help="prompt lengths of the largest-batch "
                    "rows and the sweep (none: the long row alone)")
    ap.add_argument("--gen-len", type=int, default=GEN_LEN)
    ap.add_argument("--long-prompt", type=int, default=LONG_PROMPT, help="the long-context row's prompt (0: none)")
    ap.add_argument("--quick", action="store_true", help="only the largest batches (and batch 1 of the long row)")
    ap.add_argument("--repeats", type=int, default=1, help="run the plan this many times, round after round (each "
                    "configuration's best counts): the device host's speed drifts by tens of percent within minutes")
    ap.add_argument("--time-limit", type=float, default=0, help="start no row after this many seconds (0: none); "
                    "the results file is rewritten after every row")
    ap.add_argument("--append", action="store_true", help="add this call's rows to those of --out, written by an "
                    "earlier call with the same card, commit, model, budget, gen-len, torch, transformers and 50/50 "
                    "head bits: one results file from several calls of a machine whose calls are time-limited; each "
                    "row records its call")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    if args.gen_len < 2:
        ap.error("--gen-len: at least 2 (the prefill's token and one decode step)")
    if args.repeats < 1:
        ap.error("--repeats: at least 1")
    if not args.prompts and not args.long_prompt:
        ap.error("nothing to run: no --prompts and --long-prompt 0")
    card = torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "CPU"
    earlier = _earlier_results(args, card) if args.append and os.path.exists(args.out) else None
    t0 = time.time()
    model, tokens, calib, description = load(args.model, args.device)
    configs = Configs(model, None)
    if any(c.startswith("mix50") for c in args.configs):
        configs.mix_bits = mixed_bits(model, calib)
    budget = args.budget_gib * GIB
    needed = max(args.prompts + [args.long_prompt]) + 1
    if tokens.numel() < needed:
        tokens = tokens.repeat(-(-needed // tokens.numel()))
    plan = build_plan(configs, args.configs, args.prompts, args.gen_len, budget, args.quick, args.long_prompt)
    plan = [(r,) + row for r in range(args.repeats) for row in plan]  # rounds: every configuration once in each
    # Warm-up (kernel selection, library loading) for each configuration, not measured.
    for config in args.configs:
        configs.use(config)
        generate(configs, config, prompts(tokens, 2, 256, args.device), 4)
    layers, heads, dim = configs.shape
    result = {
        "card": card, "commit": commit(), "date": datetime.date.today().isoformat(),
        "model": {"name": args.model, "description": description, "layers": layers, "kv_heads": heads,
                  "q_heads": model.config.num_attention_heads, "head_dim": dim},
        "budget_gib": args.budget_gib, "gen_len": args.gen_len, "repeats": args.repeats, "fp16_decode_sdpa": "flash (fp16_sdpa_auto: SDPA's choice)",
        "mix50_head_bits": configs.mix_bits,
        "fp16_bytes_per_token": turboattn.dense_kv_bytes_per_token(*configs.shape),
        "turbo_bytes_per_token": {c: turbo_cache_bytes(configs.shape, configs.cache_bits(c), 1, 1 << 16) / (1 << 16)
                                  for c in args.configs if c not in FP16_CONFIGS},
        "largest_context": {c: largest_context(c, configs.shape, configs.cache_bits(c), budget, args.gen_len)
                            for c in args.configs},
        "planned_rows": len(plan), "rows": [], "torch": torch.__version__, "transformers": transformers.__version__,
    }
    this_call = {"configs": args.configs, "prompts": args.prompts, "long_prompt": args.long_prompt,
                 "quick": args.quick, "repeats": args.repeats, "planned_rows": len(plan)}
    result["calls"] = [this_call]
    names = list(args.configs)
    if earlier is not None:
        mismatch = ["model"] if earlier.get("model") != result["model"] else []
        if earlier.get("mix50_head_bits") and result["mix50_head_bits"] and \
                earlier["mix50_head_bits"] != result["mix50_head_bits"]:
            mismatch.append("mix50_head_bits")
        if mismatch:
            raise SystemExit(f"--append: {args.out} was written with another {', '.join(mismatch)}; "
                             "write a new file instead")
        calls = earlier.get("calls") or [{"planned_rows": earlier["planned_rows"]}]
        result["calls"] = calls + [this_call]
        result["planned_rows"] += earlier["planned_rows"]
        result["repeats"] = max(earlier["repeats"], args.repeats)
        result["mix50_head_bits"] = result["mix50_head_bits"] or earlier.get("mix50_head_bits")
        for key in ("turbo_bytes_per_token", "largest_context"):
            result[key] = {**earlier[key], **result[key]}
        result["rows"] = earlier["rows"]
        names = list(dict.fromkeys([r["config"] for r in earlier["rows"]] + names))
    call = len(result["calls"]) - 1
    seconds_before = earlier["seconds"] if earlier else 0.0
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

    def save():
        result["max_throughput"] = summarize(result["rows"], names)
        this_call["seconds"] = round(time.time() - t0, 1)
        result["seconds"] = round(seconds_before + this_call["seconds"], 1)
        with open(args.out + ".part", "w") as f:  # whole or not at all: a call may be killed at its time limit
            json.dump(result, f, indent=1)
        os.replace(args.out + ".part", args.out)

    bar = Progress(len(plan), "serve")
    done = 0
    for repeat, prompt, config, batch, largest, profile in plan:
        if args.time_limit and time.time() - t0 > args.time_limit:
            bar.write(f"time limit: {len(plan) - done} of {len(plan)} rows not run")
            break
        row = run_row(configs, tokens, prompt, config, batch, largest, profile, args.gen_len, args.device)
        row["repeat"], row["call"] = repeat, call
        result["rows"].append(row)
        done += 1
        save()
        bar.update()
        tps = row["tokens_per_s"]
        bar.write(f"{config:>14} prompt {prompt:>6} batch {batch:>5}/{largest:<5} "
                  + (f"{tps:10.0f} tok/s  ttft {row['ttft_ms']:8.1f} ms  step {row['per_token_ms']:7.2f} ms  "
                     f"host in attention {row['attention_host_ms_per_step']:6.2f} ms (library "
                     f"{row['library_host_ms_per_step']:5.2f})  peak {row['peak_mem_gib'] or 0:6.2f} GiB"
                     if tps else f"error: {row['error']}")
                  + (f"  attention {row['attention_ms_per_step']:.2f} ms ({row['attention_share']:.0%}), kernels "
                     f"{row['gpu_busy_ms_per_step']:.2f} ms" if row.get("attention_share") else ""))
    bar.close()
    save()
    print("max throughput:", json.dumps(result["max_throughput"]), flush=True)
    if result["rows"]:
        try:
            plot(result, os.path.splitext(args.out)[0] + ".png")
        except ImportError as e:
            print(f"no plot ({e})")
    return result


def plot(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lens = sorted({r["prompt_len"] for r in result["rows"]})
    fig, axes = plt.subplots(1, len(lens), figsize=(3.2 * len(lens), 3.6), squeeze=False)
    configs = list(dict.fromkeys(r["config"] for r in result["rows"]))
    handles = {}
    for ax, n in zip(axes[0], lens):
        for i, config in enumerate(configs):  # one colour per configuration in every panel
            best = {}  # per batch, the best of the repeats
            for r in result["rows"]:
                if r["config"] == config and r["prompt_len"] == n and r["tokens_per_s"]:
                    best[r["batch"]] = max(best.get(r["batch"], 0.0), r["tokens_per_s"])
            pts = sorted(best.items())
            if pts:
                handles[config] = ax.plot(*zip(*pts), marker="o", color=f"C{i % 10}", label=config)[0]
        ax.set_xscale("log", base=2)
        ax.set_title(f"prompt {n // 1024}k + {result['gen_len']}")
        ax.set_xlabel("batch")
    axes[0][0].set_ylabel("tokens / s")
    axes[0][0].legend([handles[c] for c in configs if c in handles], [c for c in configs if c in handles], fontsize=7)
    fig.suptitle(f"serving, KV budget {result['budget_gib']:g} GiB, {result['model']['name']} "
                 f"({result['card']}, {result['commit']}, {result['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

"""Hugging Face transformers integration: prefill through FlashQ + SAS, decode over the compressed cache.

    import turboattn.hf
    model = turboattn.hf.patch(model, turboattn.hf.TurboConfig(bits=4))
    out = model.generate(**inputs, max_new_tokens=64)        # a TurboCache is created for each call

patch() registers the attention function "turboattn" through transformers' AttentionInterface (and
its mask function through AttentionMaskInterface) and switches the model to it. TurboCache, a
transformers Cache, holds one turboattn.KVCache for all layers. The model calls cache.update(k, v)
then the attention function; update only counts the tokens and hands the new k, v through, and the
attention function does the work, because only it sees the padding mask:
- prefill (the layer holds nothing yet): turboattn.attention on the new q, k, v (causal), then a
  bulk write of the non-padded k, v into the compressed cache;
- later steps: append (or write) the new tokens, then KVCache.decode of the new queries (one
  KVCache.append_decode call per layer for a decode step in which every row has a new token).
The cache is never dequantized as a whole; decode reads it block by block (docs/FORMATS.md 4).
Without a TurboCache (use_cache=False, or another Cache) the function is plain turboattn.attention
over the k, v it is given. docs/INTEGRATION.md has the details and the limitations.
"""
import dataclasses
import inspect
import json
import os
import threading
import warnings
import weakref

import torch

from . import InvalidArgument, KVCache, OutOfCapacity, Unsupported, assign_head_bits, attention, head_priority

try:
    from transformers import AttentionInterface
    from transformers.cache_utils import Cache, CacheLayerMixin
    from transformers.masking_utils import AttentionMaskInterface, causal_mask_function, sdpa_mask
except ImportError as e:  # transformers before the AttentionInterface / cache-layer API (4.56)
    raise ImportError(f"turboattn.hf needs transformers >= 4.56 with AttentionInterface and cache layers: {e}") from e

__all__ = ["TurboConfig", "TurboCache", "CudaGraphDecoder", "patch", "unpatch", "make_cache", "cache_pages", "calibrate", "load_head_bits",
           "ATTN_IMPLEMENTATION"]

ATTN_IMPLEMENTATION = "turboattn"
_CALIBRATE_IMPLEMENTATION = "turboattn_calibrate"
SUPPORTED_HEAD_DIMS = (64, 96, 128, 256)
MAX_KV_HEADS = 64  # TA_MAX_KV_HEADS
_BLOCK = 64  # tokens per cache page


@dataclasses.dataclass
class TurboConfig:
    """Settings of the turboattn attention and cache.

    bits: 8, 4 or 2 bits per cached value for every head (when head_bits is not given).
    fraction_2bit: with a calibration file in head_bits, the fraction it was made for (checked);
        without one it must be 0 (which heads go to 2 bits needs calibrate()).
    head_bits: bits per (layer, KV head), num_layers * num_kv_heads values in {8, 4, 2}, or the path
        of a calibrate() JSON file; takes precedence over bits.
    use_sas, smooth_k: FlashQ + SAS options (docs/FORMATS.md 1.4, 2).
    max_seqs, max_seq_len, num_pages: cache sizing; None sizes the cache for each generate() call
        (its batch and max length) or, in make_cache, from its arguments.
    split_tiles: split-KV decode, in 64-token tiles per split (0: none).
    prefill: "flashq" (FlashQ + SAS, INT8) or "sdpa" (PyTorch's FP16/BF16 scaled_dot_product_attention,
        exact): how attention over the new tokens of a prompt is computed. Either way the keys and
        values go into the compressed cache and every later step decodes over it. "sdpa" separates
        the cache's cost from the prefill's (and is faster on GPUs where turboattn's prefill kernel is
        not yet, docs/BENCHMARKS.md).
    """
    bits: int = 4
    fraction_2bit: float = 0.0
    head_bits: object = None
    use_sas: bool = True
    smooth_k: bool = True
    max_seqs: int = None
    max_seq_len: int = None
    num_pages: int = None
    split_tiles: int = 0
    prefill: str = "flashq"

    def validate(self):
        if self.bits not in (8, 4, 2):
            raise ValueError(f"TurboConfig.bits: {self.bits!r}, expected 8, 4 or 2")
        if not (isinstance(self.fraction_2bit, (int, float)) and 0.0 <= self.fraction_2bit <= 1.0):
            raise ValueError(f"TurboConfig.fraction_2bit: {self.fraction_2bit!r}, expected a number in [0, 1]")
        if self.fraction_2bit > 0 and self.head_bits is None:
            raise ValueError(f"TurboConfig.fraction_2bit={self.fraction_2bit} needs per-head priorities: run "
                             "turboattn.hf.calibrate(model, tokenizer_or_input_ids, fraction_2bit, path) and pass "
                             "head_bits=path")
        for name in ("max_seqs", "max_seq_len", "num_pages"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < (0 if name == "num_pages" else 1)):
                raise ValueError(f"TurboConfig.{name}: {value!r}, expected a positive integer or None")
        if not isinstance(self.split_tiles, int) or self.split_tiles < 0:
            raise ValueError(f"TurboConfig.split_tiles: {self.split_tiles!r}, expected an integer >= 0")
        if self.prefill not in ("flashq", "sdpa"):
            raise ValueError(f"TurboConfig.prefill: {self.prefill!r}, expected 'flashq' or 'sdpa'")
        return self


# ---- model shape ----

def _text_config(model_or_config):
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def _shape(model_or_config):
    """(num_layers, num_kv_heads, head_dim) of a decoder, checked against what turboattn supports."""
    c = _text_config(model_or_config)
    layers = c.num_hidden_layers
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise Unsupported(2, f"head dim {head_dim} of {c.model_type} is not supported (64, 96, 128 or 256)")
    if kv_heads > MAX_KV_HEADS or heads % kv_heads:
        raise Unsupported(2, f"{heads} query heads over {kv_heads} KV heads: turboattn needs KV heads <= "
                             f"{MAX_KV_HEADS} and query heads a multiple of them")
    if getattr(c, "attn_logit_softcapping", None) is not None:
        raise Unsupported(2, f"{c.model_type} caps attention logits (attn_logit_softcapping="
                             f"{c.attn_logit_softcapping}); turboattn's attention has no softcapping")
    if getattr(c, "kv_sharing_modes", None) is not None or getattr(c, "num_kv_shared_layers", 0):
        raise Unsupported(2, f"{c.model_type} shares KV caches between layers; the turboattn cache does not")
    return layers, kv_heads, head_dim


# ---- tensor parallelism ----

def _tensor_parallel(model_or_config):
    """(rank, size, process group) of this process in the model's tensor-parallel group (transformers'
    tp_plan), or (0, 1, None) for a model on one device (or a config). Each rank's attention modules then
    hold a contiguous slice of the heads: transformers shards q_proj, k_proj and v_proj by output rows, so
    rank r computes KV heads [r * H / size, (r + 1) * H / size) and their query heads."""
    size = int(getattr(model_or_config, "_tp_size", None) or 1)
    if size == 1:
        return 0, 1, None
    mesh = getattr(model_or_config, "_device_mesh", None)
    names = getattr(mesh, "mesh_dim_names", None) or ()
    tp = mesh["tp"] if mesh is not None and mesh.ndim > 1 and "tp" in names else mesh
    if tp is None or tp.ndim != 1 or tp.size() != size:
        raise Unsupported(2, f"the model is split {size} ways (tp_size) but its device mesh ({mesh}) has no "
                             "one-dimensional tensor-parallel part of that size")
    return tp.get_local_rank(), size, tp.get_group()


def _rank_shape(model):
    """(num_layers, KV heads on this rank, head_dim, rank, size): _shape for this rank's slice of the heads."""
    layers, kv_heads, head_dim = _shape(model)
    rank, size, _ = _tensor_parallel(model)
    heads = _text_config(model).num_attention_heads
    if kv_heads % size or heads % size:
        raise Unsupported(2, f"tensor parallelism over {size} ranks needs the query heads ({heads}) and the KV heads "
                             f"({kv_heads}) to be multiples of {size}; each rank's cache holds whole KV heads")
    return layers, kv_heads // size, head_dim, rank, size


def _rank_head_bits(bits, layers, kv_heads, rank, size):
    """This rank's slice (per layer, its KV heads) of a model's per-(layer, KV head) bits."""
    per = kv_heads // size
    return [b for l in range(layers) for b in bits[l * kv_heads + rank * per:l * kv_heads + (rank + 1) * per]]


# ---- head bits ----

def load_head_bits(path, model_or_config=None):
    """Reads a calibrate() file; with a model, checks that it was made for that model's shape."""
    with open(path) as f:
        data = json.load(f)
    for key in ("num_layers", "num_kv_heads", "head_bits"):
        if key not in data:
            raise ValueError(f"{path}: not a turboattn calibration file (no '{key}')")
    bits = [int(b) for b in data["head_bits"]]
    if len(bits) != data["num_layers"] * data["num_kv_heads"]:
        raise ValueError(f"{path}: {len(bits)} head_bits, expected num_layers * num_kv_heads = "
                         f"{data['num_layers'] * data['num_kv_heads']}")
    if model_or_config is not None:
        layers, kv_heads, _ = _shape(model_or_config)
        if (data["num_layers"], data["num_kv_heads"]) != (layers, kv_heads):
            raise ValueError(f"{path}: made for {data['num_layers']} layers x {data['num_kv_heads']} KV heads "
                             f"({data.get('model')}), the model has {layers} x {kv_heads}")
    return data


def _resolve_head_bits(config, model_or_config):
    """The per-(layer, head) bits the cache is created with."""
    layers, kv_heads, _ = _shape(model_or_config)
    hb = config.head_bits
    if hb is None:
        return [config.bits] * (layers * kv_heads)
    if isinstance(hb, (str, os.PathLike)):
        data = load_head_bits(hb, model_or_config)
        if config.fraction_2bit and abs(float(data.get("fraction_2bit", -1)) - config.fraction_2bit) > 1e-6:
            raise ValueError(f"TurboConfig.fraction_2bit={config.fraction_2bit} but {hb} was calibrated for "
                             f"fraction_2bit={data.get('fraction_2bit')}")
        hb = data["head_bits"]
    bits = [int(b) for b in hb]
    if len(bits) != layers * kv_heads:
        raise ValueError(f"TurboConfig.head_bits: {len(bits)} values, expected num_layers * num_kv_heads = "
                         f"{layers} * {kv_heads} = {layers * kv_heads}")
    bad = [i for i, b in enumerate(bits) if b not in (8, 4, 2)]
    if bad:
        raise ValueError(f"TurboConfig.head_bits[{bad[0]}] (layer {bad[0] // kv_heads}, head {bad[0] % kv_heads}): "
                         f"{bits[bad[0]]}, expected 8, 4 or 2")
    return bits


# ---- the cache ----

def cache_pages(max_seqs, max_seq_len):
    """Pages a KVCache needs for max_seqs sequences of max_seq_len tokens: each sequence's full blocks
    after the first (which has its own region; a last partial block sits in the INT8 buffer)."""
    return max_seqs * max(0, max_seq_len // _BLOCK - 1)


class _TurboLayer(CacheLayerMixin):
    """One layer's view of the shared KVCache: transformers' bookkeeping only (tokens seen, padding
    included). The compressed data lives in the KVCache; the attention function writes it."""

    is_compileable = False
    is_croppable = False
    is_sliding = False

    def __init__(self, owner, layer_idx):
        super().__init__()
        self.keys = self.values = None  # never filled: the data is in the KVCache
        self.is_initialized = False
        # A weak reference: the cache holds its layers, and a cycle would keep the KVCache (GPU memory)
        # alive after the last user reference until the garbage collector happens to run.
        self.owner, self.layer_idx = weakref.proxy(owner), layer_idx
        self.seen = 0

    def lazy_initialization(self, key_states, value_states):
        self.device, self.dtype = key_states.device, key_states.dtype
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.owner._begin_update(self.layer_idx, key_states)
        self.seen += key_states.shape[-2]
        # Only the new tokens go on: the attention function attends over the compressed cache.
        return key_states, value_states

    def get_mask_sizes(self, query_length, *args, **kwargs):
        if isinstance(query_length, torch.Tensor):  # transformers 4.x passes cache_position
            query_length = query_length.shape[0]
        return self.seen + query_length, 0

    def get_seq_length(self, *args, **kwargs):
        return self.seen

    def get_max_length(self):
        return self.owner.max_seq_len

    def get_max_cache_shape(self):  # the transformers 4.x name
        return self.owner.max_seq_len

    def reset(self):
        self.seen = 0
        self.is_initialized = False

    def offload(self):
        raise NotImplementedError("the turboattn cache cannot be offloaded")

    def prefetch(self):
        pass

    def crop(self, tokens_to_remove):
        if tokens_to_remove != 0:
            raise NotImplementedError("the turboattn cache cannot drop tokens (crop): assisted or speculative "
                                      "generation through transformers is not supported")

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("the turboattn cache cannot reorder sequences: beam search is not supported")

    def batch_repeat_interleave(self, repeats):
        if self.seen:
            raise NotImplementedError("the turboattn cache cannot repeat sequences once filled")

    def batch_select_indices(self, indices):
        if self.seen:
            raise NotImplementedError("the turboattn cache cannot select sequences once filled")


_current = threading.local()  # the TurboCache whose update() ran last on this thread


class TurboCache(Cache):
    """A transformers Cache over one turboattn.KVCache (all layers, one sequence slot per batch row).

    Pass it to generate() as past_key_values=... or let patch() create one per generate() call. It
    serves one batch: the first prefill takes a slot per row, and later calls continue those rows
    (multi-turn use: pass the same cache again with the longer ids).
    """

    def __init__(self, model, config=None, *, max_seqs=None, max_seq_len=None, num_pages=None):
        config = (config or getattr(model, "_turboattn_config", None) or TurboConfig()).validate()
        layers, kv_heads, head_dim, rank, size = _rank_shape(model)
        text = _text_config(model)
        self.config = config
        # Under tensor parallelism this rank's cache holds its own KV heads (num_kv_heads of them) at the
        # bits the model-wide allocation gives them (model_head_bits, over all heads).
        self.tp_rank, self.tp_size = rank, size
        self.num_layers, self.num_kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.model_head_bits = _resolve_head_bits(config, model)
        self.head_bits = _rank_head_bits(self.model_head_bits, layers, kv_heads * size, rank, size)
        self.max_seqs = int(config.max_seqs or max_seqs or 1)
        default_len = min(int(getattr(text, "max_position_embeddings", 4096) or 4096), 4096)
        self.max_seq_len = int(config.max_seq_len or max_seq_len or default_len)
        pages = config.num_pages if config.num_pages is not None else num_pages
        # Enough for every sequence at max_seq_len: its full blocks after the first (which has its own region).
        self.num_pages = int(pages if pages is not None else cache_pages(self.max_seqs, self.max_seq_len))
        self._text_config = text
        device = getattr(model, "device", torch.device("cpu"))
        self.kv, self.cache_device = self._create(device)
        self.torch_device = torch.device(self.cache_device)
        self.seqs = None  # KVCache sequence ids, one per batch row, from the first prefill
        self._seq_array = None  # the same, converted once for the library (KVCache.sequence_array)
        # Cached (non-padded) tokens per row, per layer: int64 [B] CPU tensors, updated without a
        # Python loop over the rows (at a serving batch of a thousand rows such loops were milliseconds
        # of host time per step).
        self._lengths = [None] * layers
        self._pending = None
        self._step_memo = None  # this forward's mask, read once (_step_mask)
        self._bookkeeping_memo = None  # this forward's bookkeeping, computed once (_bookkeeping)
        self._graph_decoder = None  # an open CudaGraphDecoder over this cache: its steps only, until closed
        super().__init__(layers=[_TurboLayer(self, i) for i in range(layers)])

    def _create(self, device):
        args = (self.num_layers, self.num_kv_heads, self.head_dim, self.num_pages, self.max_seqs, self.max_seq_len)
        device = torch.device(device)
        if device.type == "cuda":
            name = f"cuda:{device.index}" if device.index is not None else "cuda"
            try:
                kv = KVCache(*args, head_bits=self.head_bits, smooth_k=self.config.smooth_k, device=name)
                return kv, getattr(kv, "device", name)
            except Unsupported:
                # A library built without the CUDA cache: a CPU cache, with copies each step (slow, correct).
                warnings.warn("turboattn: this build has no KV cache on CUDA; the cache stays on the CPU and each "
                              "step copies the new k, v and q there")
        return KVCache(*args, head_bits=self.head_bits, smooth_k=self.config.smooth_k), "cpu"

    # transformers calls update(k, v, layer_idx, ...) right before the attention function.
    def _begin_update(self, layer_idx, key_states):
        impl = getattr(self._text_config, "_attn_implementation", None)
        if impl != ATTN_IMPLEMENTATION:
            raise RuntimeError(f"TurboCache needs the '{ATTN_IMPLEMENTATION}' attention implementation (the model "
                               f"uses '{impl}'): call turboattn.hf.patch(model) first")
        if self._pending is not None:
            raise RuntimeError(f"TurboCache: layer {self._pending[0]} updated the cache but its attention did not run "
                               "through turboattn")
        if self._graph_decoder is not None and not self._graph_decoder._in_step:
            raise RuntimeError("TurboCache: a CudaGraphDecoder replays steps over this cache; close() it before "
                               "running the model on the cache otherwise")
        if key_states.shape[1] != self.num_kv_heads:
            raise InvalidArgument(1, f"TurboCache: layer {layer_idx} gives {key_states.shape[1]} KV heads, the cache "
                                     f"holds {self.num_kv_heads} (tensor-parallel rank {self.tp_rank} of {self.tp_size})")
        self._pending = (layer_idx, key_states)
        _current.cache = self

    def _take_pending(self, layer_idx, key_states):
        pending, self._pending = self._pending, None
        if pending is None:
            return False
        if pending[0] != layer_idx or pending[1] is not key_states:
            raise RuntimeError(f"TurboCache: the key states of layer {layer_idx} are not those given to cache.update "
                               "(this model transforms them in between; it is not supported)")
        return True

    def reset(self):
        if self._graph_decoder is not None:
            raise RuntimeError("TurboCache: a CudaGraphDecoder replays steps over this cache; close() it first")
        if self.seqs is not None:
            for s in self.seqs:
                self.kv.release_sequence(s)
        self.seqs = self._seq_array = None
        self._lengths = [None] * self.num_layers
        self._pending = None
        self._step_memo = self._bookkeeping_memo = None
        super().reset()

    @property
    def lengths(self):
        """Cached (non-padded) tokens per batch row, per layer: lists of ints, None before a layer's first write."""
        return [None if n is None else n.tolist() for n in self._lengths]

    def memory(self):
        """KVCache.memory(): bytes per token of the compressed pages vs FP16, pool and buffer bytes."""
        return self.kv.memory()

    def _sequences(self, batch):
        if self.seqs is None:
            if batch > self.max_seqs:
                raise InvalidArgument(1, f"batch of {batch} sequences but the cache has max_seqs={self.max_seqs}")
            self.seqs = [self.kv.add_sequence() for _ in range(batch)]
            self._seq_array = self.kv.sequence_array(self.seqs)
        elif len(self.seqs) != batch:
            raise InvalidArgument(1, f"batch of {batch} sequences but this cache holds {len(self.seqs)}; use a new "
                                     "cache (or cache.reset()) for another batch")
        return self.seqs, self._seq_array


    # The host bookkeeping a forward moves (CudaGraphDecoder: a capture runs the Python of a step that the
    # GPU only runs at each replay).
    def _host_state(self):
        return [layer.seen for layer in self.layers], list(self._lengths)

    def _restore_host_state(self, state):
        seen, lengths = state
        for layer, n in zip(self.layers, seen):
            layer.seen = n
        self._lengths = list(lengths)
        self._pending = self._step_memo = self._bookkeeping_memo = None

    def _advance(self, tokens):
        """Counts `tokens` more tokens in every row and layer (steps the GPU ran from a graph)."""
        for layer in self.layers:
            layer.seen += tokens
        self._lengths = [None if n is None else n + tokens for n in self._lengths]
        self._step_memo = self._bookkeeping_memo = None


def make_cache(model, config=None, *, batch_size=1, max_seq_len=None):
    """A TurboCache for generate():
    model.generate(**inputs, past_key_values=make_cache(model, batch_size=len(ids)))."""
    return TurboCache(model, config, max_seqs=batch_size, max_seq_len=max_seq_len)


class CudaGraphDecoder:
    """Decode steps of a patched model replayed from one CUDA graph: the whole forward (embeddings, each
    layer's append and decode over the compressed cache, logits) is captured once and each later step is
    one replay, so that a step costs its GPU time and not the host's Python (docs/INTEGRATION.md). For a
    TurboCache on CUDA after its prefill, one new token per row and step, rows without padding (a padded
    batch is refused: every row's position is the same):

        with torch.no_grad():
            logits = model(prompts, past_key_values=cache).logits[:, -1]  # the prefill, eager
            decoder = turboattn.hf.CudaGraphDecoder(model, cache, steps=255)
            for _ in range(255):
                logits = decoder.step(logits.argmax(-1, keepdim=True))  # [B, vocab]
            decoder.close()

    steps: how many steps will run; their pages are taken up front (KVCache.reserve: OutOfCapacity if
    they do not fit, and step() refuses more). The first step runs eagerly (it also sizes the library's
    workspaces) and captures the graph; later ones copy the new tokens and their position into the
    graph's inputs and replay it. step() returns the graph's output buffer, which the next step
    overwrites. close() brings the cache's host bookkeeping up to the tokens the replays appended
    (KVCache.sync); until then the cache refuses other forwards and reset()."""

    def __init__(self, model, cache, steps):
        if not isinstance(cache, TurboCache):
            raise InvalidArgument(1, f"CudaGraphDecoder takes a TurboCache, not {type(cache).__name__}")
        if not str(cache.cache_device).startswith("cuda"):
            raise Unsupported(2, "CudaGraphDecoder needs a TurboCache on a CUDA device")
        if cache.tp_size > 1:
            raise Unsupported(2, "CudaGraphDecoder does not capture tensor-parallel models")
        if cache.seqs is None or cache.layers[0].seen == 0:
            raise InvalidArgument(1, "CudaGraphDecoder: run the prompts' prefill through the cache first")
        # Every row's position is the tokens seen, padding included: rows must have no padding.
        if cache._lengths[0] is None or not bool((cache._lengths[0] == cache.layers[0].seen).all()):
            raise InvalidArgument(1, "CudaGraphDecoder: the batch has padded rows (each step's position is shared by "
                                     "every row); decode them eagerly")
        if cache._graph_decoder is not None:
            raise InvalidArgument(1, "CudaGraphDecoder: another one is open over this cache; close() it first")
        self.model, self.cache = model, cache
        cache.kv.reserve(cache._seq_array, steps)
        cache._graph_decoder, self._in_step = self, False
        device = cache.torch_device
        self._ids = torch.zeros(len(cache.seqs), 1, dtype=torch.long, device=device)
        self._position = torch.zeros(1, 1, dtype=torch.long, device=device)  # every row's (no padding)
        self._kwargs = {_cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}
        self._graph = self._logits = None
        self._left, self._replays, self._closed, self._broken = int(steps), 0, False, False

    def _forward(self):
        self._in_step = True
        try:
            with torch.no_grad():
                return self.model(input_ids=self._ids, position_ids=self._position, **self._kwargs).logits[:, -1]
        finally:
            self._in_step = False

    def step(self, input_ids):
        """Runs one decode step on input_ids [B, 1] (the rows' new tokens); returns the logits [B, vocab]."""
        if self._closed:
            raise RuntimeError("CudaGraphDecoder: closed")
        if self._broken:
            raise RuntimeError("CudaGraphDecoder: its capture failed; close() it (the cache then continues eagerly)")
        if self._left <= 0:
            raise OutOfCapacity(3, "CudaGraphDecoder: every step it was made for has run (make it with more steps)")
        self._ids.copy_(input_ids)
        self._position.fill_(self.cache.layers[0].seen + self._replays)
        self._left -= 1
        if self._graph is not None:
            self._graph.replay()
            self._replays += 1
            return self._logits
        logits = self._forward()  # eager: appends its token as any step does
        saved = self.cache._host_state()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._logits = self._forward()
        except BaseException:
            self._broken = True  # appends may have been captured: only close() (a sync) is left
            raise
        finally:
            self.cache._restore_host_state(saved)  # the capture ran the step's Python, not its GPU work
        self._graph = graph
        return logits

    def close(self):
        """Takes the replays' tokens into the cache's bookkeeping and releases the graph."""
        if self._closed:
            return
        self._closed = True
        self._graph = self._logits = None
        if self.cache._graph_decoder is self:
            self.cache._graph_decoder = None
        try:
            self.cache.kv.sync()  # also after a capture that failed part way: appends may have been captured
        finally:  # sync takes the device's lengths even when it raises
            self.cache._advance(self._replays)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- masks ----

def _turbo_mask(batch_size=None, q_length=None, kv_length=None, q_offset=0, kv_offset=0,
                mask_function=causal_mask_function, attention_mask=None, **kwargs):
    """The mask turboattn's attention function takes: None (causal, no padding), the 2D padding mask
    [B, kv_length] (causal plus padding), or for any other pattern sdpa's 4D boolean mask, which the
    attention function accepts only where it is causal plus padding."""
    # Causal with the queries at the end of the keys (a dynamic cache): the padding alone says it all.
    # Anything else (a static cache's unused slots, sliding windows, ...) becomes a 4D mask, checked later.
    cache_position = kwargs.get("cache_position")  # transformers 4.x gives positions, not q_length / q_offset
    if q_length is None and cache_position is not None:
        q_length, q_offset = cache_position.shape[0], int(cache_position[0])
    ends_at_keys = q_offset is None or q_length is None or int(q_offset) + q_length == kv_length
    if mask_function is causal_mask_function and not kv_offset and ends_at_keys:
        if attention_mask is None:
            return None
        mask = attention_mask[:, -kv_length:].to(torch.bool)
        return None if mask.shape[1] == kv_length and bool(mask.all()) else mask
    # Never sdpa's None for "causal": that is top-left aligned where the keys outnumber the queries.
    kwargs["allow_is_causal_skip"] = False
    if cache_position is None:
        kwargs.update(q_length=q_length, q_offset=q_offset)
    return sdpa_mask(batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset, mask_function=mask_function,
                     attention_mask=attention_mask, **kwargs)


def _valid_keys(mask, q_len, kv_len):
    """Which of the kv_len key positions are real tokens, [B, kv_len] bool, or None for all. Raises
    where the mask is more than causal attention plus padding (a sliding window that bites, a
    bidirectional block, ...), which turboattn cannot compute."""
    if mask is None:
        return None
    if mask.dim() == 2:
        if mask.shape[1] < kv_len:
            raise InvalidArgument(1, f"attention mask of {mask.shape[1]} positions for {kv_len} keys")
        valid = mask[:, -kv_len:].to(torch.bool)
        return None if bool(valid.all()) else valid
    if mask.dim() != 4:
        raise Unsupported(2, f"attention mask of rank {mask.dim()}: turboattn takes a 2D padding mask or a 4D mask")
    if mask.shape[-1] != kv_len or mask.shape[-2] != q_len:
        raise Unsupported(2, f"4D attention mask {tuple(mask.shape)} for {q_len} queries over {kv_len} keys")
    allowed = mask if mask.dtype == torch.bool else mask == 0
    if allowed.shape[1] > 1 and not bool((allowed == allowed[:, :1]).all()):
        raise Unsupported(2, "a 4D attention mask that differs between heads is not supported by turboattn")
    allowed = allowed[:, 0]
    # Under causal + padding the last query sees every real key (a padded query still sees them).
    valid = allowed[:, -1, :]
    causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=mask.device).tril(kv_len - q_len)
    if not torch.equal(allowed, causal[None] & valid[:, None, :]):
        raise Unsupported(2, "the attention mask is not causal attention plus padding (a sliding window over the "
                             "context, bidirectional blocks, packed sequences, or a static cache's empty slots); "
                             "turboattn cannot compute it")
    return None if bool(valid.all()) else valid


# ---- the attention function ----

def _compute_dtype(x):
    # turboattn takes fp16 or bf16; fp32 models go through fp16 (the values are quantized to INT8 anyway).
    return x.dtype if x.dtype in (torch.float16, torch.bfloat16) else torch.float16


def _cu(counts):
    """Cumulative offsets (int32, on the CPU) of per-sequence token counts (a list or an int64 tensor)."""
    counts = torch.as_tensor(counts, dtype=torch.int64)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)


# scaled_dot_product_attention takes enable_gqa from PyTorch 2.5; before, K and V heads are repeated.
_SDPA_TAKES_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _sdpa_attention(q, k, v, valid, scale):
    """_plain_attention through torch's scaled_dot_product_attention (TurboConfig.prefill="sdpa"); rows
    that see no key are zero, as turboattn.attention makes them."""
    nq, nk = q.shape[1], k.shape[1]
    qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, D]
    gqa = {}
    if q.shape[2] != k.shape[2]:
        if _SDPA_TAKES_GQA:
            gqa = {"enable_gqa": True}
        else:
            kh, vh = (t.repeat_interleave(q.shape[2] // k.shape[2], dim=1) for t in (kh, vh))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if valid is None and nq == nk:
        out = sdpa(qh, kh, vh, is_causal=True, scale=scale or None, **gqa)
        return out.transpose(1, 2)
    seen = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)  # bottom-right causal
    if valid is not None:
        seen = seen[None, None] & valid.to(q.device)[:, None, None, :]
    out = sdpa(qh, kh, vh, attn_mask=seen, scale=scale or None, **gqa)
    return out.masked_fill(~seen.any(-1, keepdim=True), 0).transpose(1, 2)


def _plain_attention(q, k, v, valid, scale, cfg):
    """q [B, Nq, Hq, D], k, v [B, Nk, Hkv, D] (fp16/bf16); valid [B, Nk] or None. Causal, bottom-right."""
    if cfg.prefill == "sdpa":
        return _sdpa_attention(q, k, v, valid, scale)
    if valid is None:
        return attention(q, k, v, causal=True, softmax_scale=scale, use_sas=cfg.use_sas, smooth_k=cfg.smooth_k)
    nq = q.shape[1]
    valid_q = valid[:, -nq:]
    qp, kp, vp = q[valid_q], k[valid], v[valid]  # packed [T, H, D]: padding removed
    out = torch.zeros_like(q)
    if qp.shape[0]:
        cu_q, cu_k = _cu(valid_q.sum(1).tolist()), _cu(valid.sum(1).tolist())
        if q.is_cuda:
            cu_q, cu_k = cu_q.to(q.device), cu_k.to(q.device)
        out[valid_q] = attention(qp, kp, vp, causal=True, softmax_scale=scale, use_sas=cfg.use_sas,
                                 smooth_k=cfg.smooth_k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k)
    return out


def _mask_facts(valid, B, nq):
    """What the cached path needs of the mask on the host: (valid_new [B, nq] bool on the CPU, or None
    when every new token is real; real new tokens per row; real earlier tokens per row, or None), the
    counts as int64 [B] CPU tensors."""
    if valid is None:
        return None, torch.full((B,), nq, dtype=torch.int64), None
    valid_new = valid[:, -nq:].cpu()
    counts = valid_new.sum(1)
    seen_real = valid[:, :-nq].sum(1).cpu() if valid.shape[1] > nq else torch.zeros(B, dtype=torch.int64)
    return (None if bool((counts == nq).all()) else valid_new), counts, seen_real


def _step_mask(cache, layer, attention_mask, B, nq, kv_len):
    """(valid, facts) of this forward's mask (_valid_keys, _mask_facts), read at layer 0 and reused by the
    forward's other layers, which get the same mask object: each read syncs the device."""
    memo = cache._step_memo
    if memo is None or layer == 0 or memo[0] is not attention_mask or memo[1] != (B, nq, kv_len):
        valid = _valid_keys(attention_mask, nq, kv_len)
        memo = (attention_mask, (B, nq, kv_len), valid, _mask_facts(valid, B, nq))
        cache._step_memo = memo  # holds the mask, so its identity stays unique while memoized
    return memo[2], memo[3]


def _to_cache(x, cache):
    """x on the cache's device (a decode-step no-op: `.to` costs microseconds even then)."""
    return x if x.device == cache.torch_device else x.to(cache.torch_device)


def _bookkeeping(cache, layer, facts):
    """(rows, whether any row has cached tokens, the lengths after this call) of a layer's call: rows,
    those with new real tokens, or None for all; the lengths, int64 [B] on the CPU. A pure function of
    the step's facts and the layer's lengths, which are one object for every layer of a forward (each
    layer stores the object this returns), so it runs once per forward: its few small tensor ops cost
    microseconds each, per layer and token."""
    past = cache._lengths[layer]
    memo = cache._bookkeeping_memo
    if memo is not None and memo[0] is facts and memo[1] is past:
        return memo[2]
    _, counts, seen_real = facts
    B = counts.shape[0]
    held = torch.zeros(B, dtype=torch.int64) if past is None else past
    if seen_real is not None and not torch.equal(seen_real, held):
        raise InvalidArgument(1, f"layer {layer}: the attention mask shows {seen_real.tolist()} earlier real tokens "
                                 f"per sequence but the cache holds {held.tolist()}")
    # A sequence's first write sets its K mean, so it must not be empty: rows without new tokens are left out.
    rows = None if bool((counts > 0).all()) else [b for b in range(B) if counts[b]]
    result = (rows, bool(held.any()), held + counts)
    cache._bookkeeping_memo = (facts, past, result)  # holds both, so their identities stay unique
    return result


def _cached_attention(cache, layer, q, k, v, valid, facts, scale):
    """q [B, Nq, Hq, D], k, v [B, Nq, Hkv, D]: the new tokens, last dim contiguous; valid [B, past + Nq]
    or None, and its _mask_facts. Host work per call does not loop over the rows unless some are padding."""
    cfg, kv = cache.config, cache.kv
    B, nq = q.shape[0], q.shape[1]
    seqs, seq_array = cache._sequences(B)
    valid_new, counts, _ = facts
    rows, any_past, lengths_after = _bookkeeping(cache, layer, facts)
    kc, vc = _to_cache(k, cache), _to_cache(v, cache)
    row_seqs = seq_array if rows is None else [seqs[b] for b in rows]
    row_counts = counts if rows is None else counts[rows]
    vn = None if valid_new is None else _to_cache(valid_new, cache)

    def write_new():  # the new real tokens, packed [T, Hkv, D], in one bulk write
        if vn is None:  # every new token is real: no packing, no boolean indexing (no host syncs)
            pk, pv = kc.reshape(B * nq, *kc.shape[2:]), vc.reshape(B * nq, *vc.shape[2:])
        else:
            pk, pv = kc[vn], vc[vn]
        kv.write(layer, row_seqs, pk.contiguous(), pv.contiguous(), _cu(row_counts))

    any_new = rows is None or bool(rows)
    if not any_past:
        # Prefill: attention on the uncompressed new tokens, then one bulk write of the real ones.
        out = _plain_attention(q, k, v, None if valid is None else valid[:, -nq:], scale, cfg)
        if any_new:
            write_new()
    elif nq == 1 and rows is None:
        # A decode step's token for every row: one library call appends it and attends (the library takes
        # any strides with the last dim contiguous).
        out = kv.append_decode(layer, seq_array, kc.select(1, 0), vc.select(1, 0), _to_cache(q, cache),
                               softmax_scale=scale, use_sas=cfg.use_sas, split_tiles=cfg.split_tiles)
        out = out if out.device == q.device else out.to(q.device)
    else:
        if nq == 1 and any_new:
            kv.append(layer, row_seqs, kc[rows, 0].contiguous(), vc[rows, 0].contiguous())
        elif any_new:
            write_new()
        qc = _to_cache(q, cache)
        if valid_new is None:
            out = kv.decode(layer, seq_array, qc.contiguous(), softmax_scale=scale, use_sas=cfg.use_sas,
                            split_tiles=cfg.split_tiles).to(q.device)
        else:
            out = torch.zeros_like(q)
            # Decode takes one q_len for all its sequences: one call per distinct count of new real tokens.
            count_list = counts.tolist()
            for c in sorted(set(count_list) - {0}):
                group = [b for b in range(B) if count_list[b] == c]
                qg = qc[group][vn[group]].view(len(group), c, q.shape[2], q.shape[3])
                og = kv.decode(layer, [seqs[b] for b in group], qg.contiguous(), softmax_scale=scale,
                               use_sas=cfg.use_sas, split_tiles=cfg.split_tiles)
                og = og.to(q.device)
                sel = valid_new[group].to(q.device)
                block = out[group]
                block[sel] = og.reshape(-1, q.shape[2], q.shape[3])
                out[group] = block
    cache._lengths[layer] = lengths_after
    return out


def turboattn_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                                sliding_window=None, softcap=None, **kwargs):
    """The "turboattn" attention function: query [B, Hq, Nq, D], key, value [B, Hkv, Nk, D] (after
    RoPE) -> ([B, Nq, Hq, D], None)."""
    if softcap is not None:
        raise Unsupported(2, f"attention logit softcapping ({softcap}) is not supported by turboattn")
    if dropout and module.training:
        raise Unsupported(2, "attention dropout in training is not supported by turboattn (inference only)")
    if not getattr(module, "is_causal", True):
        raise Unsupported(2, "turboattn's transformers integration covers causal (decoder) attention only")
    cfg = getattr(module, "_turboattn_config", None) or TurboConfig()
    layer = getattr(module, "layer_idx", None)
    cache = getattr(_current, "cache", None)
    cached = cache is not None and layer is not None and cache._pending is not None and cache._take_pending(layer, key)
    _current.cache = None  # consumed: no reference kept past this call
    nq = query.shape[2]
    kv_len = (cache.layers[layer].seen if cached else key.shape[2])
    if sliding_window is not None and kv_len > sliding_window:
        raise Unsupported(2, f"layer {layer} attends over a sliding window of {sliding_window} tokens and the "
                             f"sequence has reached {kv_len}; turboattn attends over the whole context")
    if cached:
        valid, facts = _step_mask(cache, layer, attention_mask, query.shape[0], nq, kv_len)
    else:
        valid = _valid_keys(attention_mask, nq, kv_len)
    dtype = _compute_dtype(query)
    # [B, H, N, D] -> [B, N, H, D] views: turboattn takes any strides with the last dim contiguous.
    q, k, v = ((t if t.dtype == dtype else t.to(dtype)).transpose(1, 2) for t in (query, key, value))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    scale = float(scaling) if scaling else 0.0
    if cached:
        out = _cached_attention(cache, layer, q, k, v, valid, facts, scale)
    else:
        out = _plain_attention(q, k, v, valid, scale, cfg)
    return (out if out.dtype == query.dtype else out.to(query.dtype)), None


def _register():
    AttentionInterface.register(ATTN_IMPLEMENTATION, turboattn_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _turbo_mask)


def _attention_modules(model):
    # The attention function reads its settings from the module it is called with; decoder layers
    # that also carry a layer_idx get them too, harmlessly.
    return [m for m in model.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def patch(model, config=None):
    """Switches `model` (a transformers causal LM) to turboattn attention and, for generate(), to a
    TurboCache created per call (unless one is passed). Returns the model. Raises Unsupported for a
    model turboattn cannot run (head dim, softcapping, shared KV layers) and ValueError for a bad config."""
    config = (config or TurboConfig()).validate()
    _rank_shape(model)
    _resolve_head_bits(config, model)  # a bad head_bits file fails here, not at the first generate()
    _register()
    previous = getattr(model.config, "_attn_implementation", None)
    if previous != ATTN_IMPLEMENTATION:
        model._turboattn_previous_attn = previous
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(ATTN_IMPLEMENTATION)
    if getattr(_text_config(model), "_attn_implementation", None) != ATTN_IMPLEMENTATION:
        _text_config(model)._attn_implementation = ATTN_IMPLEMENTATION
        model.config._attn_implementation = ATTN_IMPLEMENTATION
    modules = _attention_modules(model)
    if not modules:
        raise Unsupported(2, f"{type(model).__name__}: no attention modules with a layer_idx found")
    for m in modules:
        m._turboattn_config = config
    model._turboattn_config = config
    _install_generate_cache(model)
    return model


def unpatch(model):
    """Back to the attention implementation the model had before patch()."""
    if hasattr(model, "_turboattn_prepare_cache"):
        model._prepare_cache_for_generation = model._turboattn_prepare_cache
        del model._turboattn_prepare_cache
    if getattr(model, "_turboattn_previous_attn", None):
        model.set_attn_implementation(model._turboattn_previous_attn)
    return model


def _cache_kwarg(model):
    """The name generate() passes the cache to the model under: the model forward's own argument,
    `past_key_values` (transformers 4.x and early 5.x) or `cache` (later 5.x, which still accepts
    `past_key_values` from users and renames it)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _install_generate_cache(model):
    """Makes generate() create a TurboCache sized for the call when it is given none."""
    original = getattr(model, "_prepare_cache_for_generation", None)
    if original is None or hasattr(model, "_turboattn_prepare_cache"):
        return
    model._turboattn_prepare_cache = original

    def prepare(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs):
        given = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if given is not None or generation_config.use_cache is False:
            return original(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length,
                            *args, **kwargs)
        if getattr(generation_config, "cache_implementation", None) is not None:
            # A static or hybrid cache hands back padded key buffers that turboattn would attend over.
            warnings.warn(f"turboattn: cache_implementation={generation_config.cache_implementation!r} is replaced "
                          "by a TurboCache")
        mode = str(getattr(generation_mode, "value", generation_mode))  # transformers 4.x passes another argument
        if (generation_config.num_beams or 1) > 1:
            mode = "beam_search"
        if "beam" in mode or mode in ("assisted_generation", "contrastive_search", "dola_generation"):
            raise Unsupported(2, f"generation mode {mode} is not supported with the turboattn cache (greedy and "
                                 "sampling are); pass use_cache=False or unpatch the model")
        rows = batch_size * max(generation_config.num_return_sequences or 1, 1)
        model_kwargs[_cache_kwarg(model)] = TurboCache(model, model._turboattn_config, max_seqs=rows,
                                                       max_seq_len=max_cache_length + 1)

    model._prepare_cache_for_generation = prepare


# ---- calibration ----

_DEFAULT_TEXT = (
    "The history of science is the study of the development of science and scientific knowledge, including both "
    "the natural and social sciences. Science is a body of empirical, theoretical, and practical knowledge about "
    "the natural world, produced by scientists who emphasize the observation, explanation, and prediction of "
    "real-world phenomena. In the kitchen, a good stock begins with cold water, bones and a few vegetables; it is "
    "skimmed, never boiled hard, and strained before it is reduced. def fibonacci(n):\n    a, b = 0, 1\n    for _ "
    "in range(n):\n        a, b = b, a + b\n    return a\n")


def _calibration_inputs(model, tokenizer_or_input_ids, text):
    device = getattr(model, "device", torch.device("cpu"))
    if isinstance(tokenizer_or_input_ids, torch.Tensor):
        ids = tokenizer_or_input_ids
        return [r[None].to(device) for r in (ids if ids.dim() == 2 else ids[None])]
    if isinstance(tokenizer_or_input_ids, (list, tuple)):
        rows = tokenizer_or_input_ids if tokenizer_or_input_ids and isinstance(tokenizer_or_input_ids[0], (list, tuple, torch.Tensor)) \
            else [tokenizer_or_input_ids]
        return [torch.as_tensor(r, dtype=torch.long).reshape(1, -1).to(device) for r in rows]
    if callable(tokenizer_or_input_ids):
        texts = [text or _DEFAULT_TEXT] if isinstance(text or _DEFAULT_TEXT, str) else list(text)
        return [tokenizer_or_input_ids(t, return_tensors="pt")["input_ids"].to(device) for t in texts]
    raise TypeError("calibrate: expected a tokenizer, input ids (a LongTensor or lists of ints)")


def _recording_attention(records):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def forward(module, query, key, value, attention_mask, **kwargs):
        # key, value [1, Hkv, N, D], after RoPE: exactly what the cache would store.
        records.setdefault(module.layer_idx, []).append(
            (key[0].transpose(0, 1).float().cpu(), value[0].transpose(0, 1).float().cpu()))
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return forward


def _replacing_attention(swap):
    """SDPA with one KV head's K and V replaced: swap = {"layer", "head", "k", "v"} ([N, D] each) or empty."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def forward(module, query, key, value, attention_mask, **kwargs):
        if swap and module.layer_idx == swap["layer"]:
            key, value = key.clone(), value.clone()
            key[0, swap["head"]] = swap["k"].to(key)
            value[0, swap["head"]] = swap["v"].to(value)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return forward


def _two_bit_round_trip(k, v, dtype):
    """k, v [N, Hkv, D] as a cache with every head at 2 bits reads them back (the library's CPU cache),
    written in `dtype` (bf16 for a bf16 model, whose values may exceed fp16's range; else fp16)."""
    n, heads, dim = k.shape
    cache = KVCache(1, heads, dim, num_pages=n // 64 + 1, max_seqs=1, max_seq_len=n, head_bits=[2] * heads)
    seq = cache.add_sequence()
    cache.write(0, [seq], k.to(dtype).contiguous(), v.to(dtype).contiguous(), torch.tensor([0, n], dtype=torch.int32))
    return cache.read(0, seq)


@torch.no_grad()
def _sensitivity(model, inputs, records, layers, kv_heads, progress):
    """Per (layer, KV head): the mean KL divergence of the model's next-token distributions on the
    calibration inputs when that head alone is stored at 2 bits (the others exact), from the FP model's.
    Under tensor parallelism every rank runs every forward pass (they are collective) and the rank that
    holds the head swaps it; the logits are gathered, so every rank measures the same KL."""
    rank, size, _ = _tensor_parallel(model)
    per_rank = kv_heads // size
    swap = {}
    AttentionInterface.register(_CALIBRATE_IMPLEMENTATION, _replacing_attention(swap))
    logits = lambda ids: model(input_ids=ids, use_cache=False).logits[0]  # [N, vocab], the model's dtype
    # The exact model's logits are kept as the model gives them (N x vocab values per input: 0.5 GiB
    # for 2,048 tokens of a 128k vocabulary in bf16), and the KL goes a block of positions at a time
    # in fp32, so that its temporaries stay a block's size.
    block = 256

    def kl_sum(exact, x):  # sum over positions of KL(softmax(exact) || softmax(x))
        total = 0.0
        for s in range(0, x.shape[0], block):
            b = torch.log_softmax(exact[s:s + block].float(), -1)
            total += (b.exp() * (b - torch.log_softmax(x[s:s + block].float(), -1))).sum().item()
        return total

    base = [logits(ids) for ids in inputs]
    dtype = torch.bfloat16 if next(model.parameters()).dtype == torch.bfloat16 else torch.float16
    out = []
    for l in range(layers):
        trips = [_two_bit_round_trip(*records[l][i], dtype) for i in range(len(inputs))]
        for h in range(kv_heads):
            kl = tokens = 0.0
            owner, local = divmod(h, per_rank)
            for i, ids in enumerate(inputs):
                k2, v2 = trips[i]
                swap.clear()
                if owner == rank:
                    swap.update(layer=l, head=local, k=k2[:, local], v=v2[:, local])
                kl += kl_sum(base[i], logits(ids))
                tokens += ids.shape[1]
            out.append(kl / tokens)
            if progress:
                progress(l * kv_heads + h + 1, layers * kv_heads)
    return out


def calibrate(model, tokenizer_or_input_ids, fraction_2bit, path, *, text=None, metric="sensitivity", progress=None):
    """Runs `model` on calibration input (a tokenizer with `text`, a built-in paragraph by default, or
    input ids), captures each layer's K (after RoPE) and V, ranks the KV heads and assigns 4 or 2 bits
    per head, then saves {model, num_layers, num_kv_heads, fraction_2bit, metric, head_bits, priority} as
    JSON at `path` (None: not saved). Returns that dict. Use it with TurboConfig(head_bits=path).

    metric "sensitivity" (default; docs/FORMATS.md 3.6): each head's priority is the KL divergence its
    storage at 2 bits alone causes on the calibration input (one more forward pass per KV head), and the
    round(fraction_2bit * layers * kv_heads) least sensitive heads of the whole model get 2 bits.
    metric "gap_std": the paper's statistic (turboattn.head_priority, no extra forward pass), normalized
    within each layer, so each layer gets round(fraction_2bit * kv_heads) 2-bit heads.
    progress(done, total) is called after each head's sensitivity.

    Under tensor parallelism (a model loaded with tp_plan) every rank calls it: the ranking covers all the
    model's heads, every rank returns the same bits, and the first rank alone writes `path`."""
    if not (isinstance(fraction_2bit, (int, float)) and 0.0 <= fraction_2bit <= 1.0):
        raise ValueError(f"calibrate: fraction_2bit {fraction_2bit!r}, expected a number in [0, 1]")
    if metric not in ("sensitivity", "gap_std"):
        raise ValueError(f"calibrate: metric {metric!r}, expected 'sensitivity' or 'gap_std'")
    layers, rank_heads, _, _, size = _rank_shape(model)
    kv_heads = rank_heads * size
    inputs = _calibration_inputs(model, tokenizer_or_input_ids, text)
    records = {}
    AttentionInterface.register(_CALIBRATE_IMPLEMENTATION, _recording_attention(records))
    AttentionMaskInterface.register(_CALIBRATE_IMPLEMENTATION, sdpa_mask)
    text_config = _text_config(model)
    previous = (model.config._attn_implementation, text_config._attn_implementation)
    try:
        model.config._attn_implementation = _CALIBRATE_IMPLEMENTATION
        text_config._attn_implementation = _CALIBRATE_IMPLEMENTATION
        with torch.no_grad():
            for ids in inputs:
                model(input_ids=ids, use_cache=False)
        missing = [i for i in range(layers) if i not in records]
        if missing:
            raise RuntimeError(f"calibrate: layers {missing} did not go through the attention interface")
        if metric == "sensitivity":
            priority = _sensitivity(model, inputs, records, layers, kv_heads, progress)
    finally:
        model.config._attn_implementation, text_config._attn_implementation = previous
    if metric == "gap_std":
        priority = []
        for i in range(layers):  # the statistic is normalized over the layer's heads: all of them, on every rank
            k = _all_heads(model, torch.cat([r[0] for r in records[i]]))
            v = _all_heads(model, torch.cat([r[1] for r in records[i]]))
            priority += head_priority(k, v)
    priority = _same_on_every_rank(model, priority)
    bits = assign_head_bits(priority, layers, kv_heads, fraction_2bit, across_layers=metric == "sensitivity")
    data = {"model": getattr(model.config, "_name_or_path", "") or model.config.model_type,
            "num_layers": layers, "num_kv_heads": kv_heads, "fraction_2bit": float(fraction_2bit), "metric": metric,
            "tokens": int(sum(ids.shape[1] for ids in inputs)), "head_bits": bits,
            "priority": [float(f"{p:.6g}") for p in priority]}
    rank, size, group = _tensor_parallel(model)
    if path is not None and rank == 0:
        with open(path, "w") as f:
            json.dump(data, f)
            f.write("\n")
    if size > 1:
        torch.distributed.barrier(group=group)  # the file is there before any rank goes on to read it
    return data


def _all_heads(model, x):
    """x [T, this rank's KV heads, D] as [T, all the model's KV heads, D] (the ranks' slices gathered in head
    order, on every rank); x itself without tensor parallelism."""
    _, size, group = _tensor_parallel(model)
    if size == 1:
        return x.contiguous()
    parts = [None] * size
    torch.distributed.all_gather_object(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=1).contiguous()


def _same_on_every_rank(model, priority):
    """The first rank's priorities of all the model's heads, on every rank: every rank computed them, and
    floating-point differences between ranks must not make their bits differ."""
    _, size, group = _tensor_parallel(model)
    if size == 1:
        return priority
    first = [priority]
    torch.distributed.broadcast_object_list(first, src=torch.distributed.get_global_rank(group, 0), group=group)
    return first[0]

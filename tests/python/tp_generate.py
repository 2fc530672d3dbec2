"""Worker of test_tensor_parallel.py. Run under torchrun with N processes it loads the model split N ways
(transformers' tp_plan="auto"); run alone (or with one process) it loads it on one device. Then, for each
configuration, greedy generation of a padded batch with its logits, and hf.calibrate with both metrics. The first rank saves
what the test compares (torch.save): per configuration the tokens, every step's logits and each rank's
cache shape and bits, and the calibration; every rank's tokens are checked to be the first rank's.

    torchrun --nproc_per_node 2 tests/python/tp_generate.py --model DIR --out tp.pt [--device cuda]
"""
import argparse
import os

import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM

from turboattn import hf

CONFIGS = ("fp16", "kv4", "mix", "mix_swapped")


def mixed_bits(layers, kv_heads, swapped):
    """Model-wide bits that differ between the two halves of each layer's heads (a rank of two holds one
    half): 4 then 2 in even layers, 2 then 4 in odd ones; `swapped` exchanges the halves."""
    half = kv_heads // 2
    bits = []
    for layer in range(layers):
        first = 4 if (layer % 2 == 0) != swapped else 2
        bits += [first] * half + [6 - first] * (kv_heads - half)
    return bits


def prompts(model_dir, vocab, device):
    """A batch of three prompts of different lengths, left-padded, long enough that the cache compresses
    blocks (its first 64 tokens and the last partial block stay INT8): text where the model has a
    tokenizer (each paragraph repeated), else random token ids."""
    texts = ["The history of science is the study of the development of science and scientific knowledge, "
             "including both the natural and social sciences. It covers",
             "In the kitchen, a good stock begins with cold water, bones and a few vegetables; it is skimmed,",
             "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n"]
    if os.path.exists(os.path.join(model_dir, "tokenizer_config.json")):
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model_dir)
        rows = [tok(" ".join([t] * 8))["input_ids"] for t in texts]
    else:
        g = torch.Generator().manual_seed(7)
        rows = [torch.randint(1, vocab, (n,), generator=g).tolist() for n in (301, 200, 257)]
    width = max(map(len, rows))
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row):] = torch.tensor(row)
        mask[r, width - len(row):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(model, config, ids, mask, new_tokens, layers, kv_heads):
    if config == "fp16":
        hf.unpatch(model)
        model.set_attn_implementation("sdpa")
        cache = None
    else:
        bits = {"kv4": None, "mix": mixed_bits(layers, kv_heads, False),
                "mix_swapped": mixed_bits(layers, kv_heads, True)}[config]
        cfg = hf.TurboConfig(bits=4, head_bits=bits)
        hf.patch(model, cfg)
        cache = hf.make_cache(model, cfg, batch_size=ids.shape[0], max_seq_len=ids.shape[1] + new_tokens + 1)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         output_logits=True, return_dict_in_generate=True, pad_token_id=0, eos_token_id=None,
                         **({"past_key_values": cache} if cache is not None else {}))
    result = {"tokens": out.sequences[:, ids.shape[1]:].cpu(),
              "logits": torch.stack([l.float().cpu() for l in out.logits])}  # [steps, batch, vocab]
    if cache is not None:
        result["cache"] = {"num_kv_heads": cache.num_kv_heads, "head_bits": cache.head_bits,
                           "model_head_bits": cache.model_head_bits}
    return result


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--new-tokens", type=int, default=12)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dtype = torch.float16 if args.device == "cuda" else torch.float32
    if world > 1:
        model = AutoModelForCausalLM.from_pretrained(args.model, tp_plan="auto", dtype=dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device)
    model.eval()
    rank, size, group = hf._tensor_parallel(model)
    assert size == world, f"the model is split {size} ways over {world} processes"
    layers, kv_heads = model.config.num_hidden_layers, model.config.num_key_value_heads
    ids, mask = prompts(args.model, model.config.vocab_size, model.device)

    results = {"world": world, "configs": {}}
    for config in args.configs:
        r = generate(model, config, ids, mask, args.new_tokens, layers, kv_heads)
        if world > 1:  # every rank generated the same tokens; each rank's cache holds its own heads
            tokens = [None] * world
            dist.all_gather_object(tokens, r["tokens"].tolist(), group=group)
            assert all(t == tokens[0] for t in tokens), f"{config}: the ranks generated different tokens"
            if "cache" in r:
                caches = [None] * world
                dist.all_gather_object(caches, r["cache"], group=group)
                r["cache"] = caches
        elif "cache" in r:
            r["cache"] = [r["cache"]]
        results["configs"][config] = r

    hf.unpatch(model)
    calib_ids = ids[2][mask[2].bool()][None]  # the last prompt without its padding
    for metric in ("sensitivity", "gap_std"):
        path = os.path.splitext(args.out)[0] + f".{metric}.json"
        calib = hf.calibrate(model, calib_ids, 0.5, path, metric=metric)
        results[f"calibration_{metric}"] = calib
        # The file the first rank wrote is there for every rank, with the same bits.
        assert hf.load_head_bits(path, model)["head_bits"] == calib["head_bits"]
        if world > 1:
            bits = [None] * world
            dist.all_gather_object(bits, calib["head_bits"], group=group)
            assert all(b == bits[0] for b in bits), f"the ranks' calibrations ({metric}) differ"
    if rank == 0:
        torch.save(results, args.out)
    if world > 1:
        dist.barrier(group=group)
        dist.destroy_process_group()


if __name__ == "__main__":
    main()

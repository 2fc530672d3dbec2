"""Tensor-parallel generation (issue 9): batched generation of a real model on one GPU and split over
several by transformers' tensor parallelism (tp_plan="auto"), FP16 against turboattn, at the same KV
cache budget per GPU. One run, one card type.

Each GPU count runs in its own torchrun job (this module with --worker), the same way as `bench serve`'s
rows (turboattn.benchmarks.serve: the same caches, step loop and clock): at a prompt length, the largest
batch whose cache fits the per-GPU budget, and, split, also the batch that fits one GPU (the same work
spread over more GPUs). A split model's ranks each hold their own heads, so N GPUs fit about N times the
batch. SmolLM2-135M's 3 KV heads do not split over 2 GPUs: the benchmark runs the same model with its
heads repeated twice (turboattn.evaluation.models.repeat_heads, the same function with 18 query and 6 KV
heads), on one GPU as well.

    turboattn bench tp [--gpus 1 2] [--out tensor_parallel.json] [--budget-gib 8]
    PYTHONPATH=bindings/python python bench/tensor_parallel.py [--out bench/results/tensor_parallel.json]
"""
import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import torch

from turboattn.benchmarks import commit, serve

CONFIGS = ("fp16_prealloc", "kv4")
GIB = 1 << 30


def prepare_model(name, repeat, directory):
    """Saves the model (heads repeated `repeat` times when above 1) with its tokenizer in `directory`."""
    from turboattn.evaluation import models
    model, tokenizer = models.load(name, "cpu", dtype=torch.float16)
    if repeat > 1:
        model = models.repeat_heads(model, repeat)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return models.MODELS.get(name, (None, None, name))[2] + (f", heads repeated x{repeat}" if repeat > 1 else "")


def worker(args):
    """One torchrun job: every rank runs every row (the steps are collective); the first writes them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, tp_plan="auto", dtype=torch.float16)
    else:
        model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float16).to("cuda")
    model.eval()
    device = model.device
    tokens = serve.text_tokens(AutoTokenizer.from_pretrained(args.model_dir), args.prompt * 2)
    configs = serve.Configs(model, None)
    layers, heads, dim = configs.shape
    max_len = args.prompt + args.gen_len + serve.PROFILE_STEPS
    budget = args.budget_gib * GIB
    for config in args.configs:  # warm-up, not measured
        configs.use(config)
        serve.generate(configs, config, serve.prompts(tokens, 2, 256, device), 4)
    rows = []
    for config in args.configs:
        largest = serve.largest_batch(config, configs.shape, configs.cache_bits(config), max_len, budget)
        # The batch one GPU fits: the whole model's heads in one cache.
        whole = (layers, configs.model_kv_heads, dim)
        one_gpu = serve.largest_batch(config, whole, configs.head_bits(config), max_len, budget)
        for batch in sorted({largest, one_gpu}, reverse=True):
            row = serve.run_row(configs, tokens, args.prompt, config, batch, largest, False, args.gen_len, device)
            row.update(gpus=world, kv_heads_per_gpu=heads)
            rows.append(row)
            if configs.rank == 0:
                print(f"{world} GPU {config:>14} batch {batch:>5}/{largest:<5} "
                      + (f"{row['tokens_per_s']:9.0f} tok/s  step {row['per_token_ms']:6.2f} ms  ttft "
                         f"{row['ttft_ms']:8.1f} ms" if row["tokens_per_s"] else f"error: {row['error']}"), flush=True)
    if configs.rank == 0:
        with open(args.worker_out, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "rows": rows}, f)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def torchrun(processes, *args):
    """The command that runs `args` (a script or -m module and its arguments) as `processes` torchrun
    processes on this machine, on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port",
            str(port), *args]


def main(argv=None, *, prog=None, default_out="tensor_parallel.json"):
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=default_out)
    ap.add_argument("--model", default="smollm2-135m", help="a turboattn.evaluation model key, directory or .gguf file")
    ap.add_argument("--repeat-heads", type=int, default=2, help="run the model with its heads repeated this many "
                    "times (1: as it is; its KV heads must then divide by every GPU count)")
    ap.add_argument("--gpus", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=serve.CONFIGS[:4])
    ap.add_argument("--budget-gib", type=float, default=8.0, help="GPU memory for the KV cache, per GPU (GiB)")
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--gen-len", type=int, default=128)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if "mix50" in args.configs:
        ap.error("mix50 needs a calibration over the split model; run kv4 or the FP16 configurations")
    if not torch.cuda.is_available() or torch.cuda.device_count() < max(args.gpus):
        ap.error(f"--gpus {args.gpus}: this machine has {torch.cuda.device_count()} CUDA devices")
    t0 = time.time()
    result = {"commit": commit(), "date": datetime.date.today().isoformat(), "budget_gib_per_gpu": args.budget_gib,
              "prompt_len": args.prompt, "gen_len": args.gen_len, "torch": torch.__version__, "rows": []}
    try:
        import transformers
        result["transformers"] = transformers.__version__
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        result["model"] = {"name": args.model, "description": prepare_model(args.model, args.repeat_heads, model_dir)}
        for gpus in args.gpus:
            part = os.path.join(tmp, f"{gpus}.json")
            cmd = torchrun(gpus, "-m", "turboattn.benchmarks.tensor_parallel", "--worker", "--model-dir", model_dir,
                           "--worker-out", part, "--prompt", str(args.prompt), "--gen-len", str(args.gen_len),
                           "--budget-gib", str(args.budget_gib), "--configs", *args.configs)
            r = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="4"))
            if r.returncode != 0 or not os.path.exists(part):
                result.setdefault("errors", []).append(f"{gpus} GPUs: worker exit {r.returncode}")
                continue
            with open(part) as f:
                data = json.load(f)
            result["card"] = data["card"]
            result["rows"] += data["rows"]
    result["seconds"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}: {len(result['rows'])} rows" + (f", errors: {result['errors']}" if "errors" in result else ""))
    return result


if __name__ == "__main__":
    main()

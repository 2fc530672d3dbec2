"""The tables of docs/ACCURACY.md from an eval/results/*.json file:

    python3 -m turboattn.evaluation.report eval/results/smollm2-135m.json
"""
import json
import sys


def _pct(x, ref):
    return f"{100 * (x / ref - 1):+.2f}%"


def markdown(result):
    rows = result["rows"]
    fp16 = next(r for r in rows if r["config"] == "fp16")
    p = result["protocol"]
    lines = [f"{result['model'].get('name', '')} on {result.get('card', '?')}, commit {result.get('commit', '?')}, "
             f"{result.get('date', '?')}: {p['windows']} windows of held-out text, prefix {p['prefix']} tokens "
             f"(prefill scored on its last {p['score_prefill']}), then {p['steps']} decode steps each.", "",
             "| config | KV bytes/token | vs FP16 | prefill ppl | decode ppl | vs FP16 | decode KL | top-1 agree | passkey |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        d = r["decode"]
        passkey = f"{r['passkey']:.2f}" if "passkey" in r else ""
        lines.append(f"| {r['config']} | {r['kv_bytes_per_token']:.0f} | {fp16['kv_bytes_per_token'] / r['kv_bytes_per_token']:.2f}x "
                     f"| {r['prefill']['ppl']:.3f} | {d['ppl']:.3f} | {_pct(d['ppl'], fp16['decode']['ppl'])} "
                     f"| {d['kl']:.4f} | {d['top1_agree']:.3f} | {passkey} |")
    with_passkey = [r for r in rows if "passkey_by_length" in r]
    if with_passkey:
        lengths = list(with_passkey[0]["passkey_by_length"])
        lines += ["", f"Passkey accuracy by context length ({len(p['passkey_depths'])} depths x {p['passkey_keys']} keys "
                  "per cell):", "", "| config | " + " | ".join(lengths) + " |", "| --- |" + " --- |" * len(lengths)]
        for r in with_passkey:
            lines.append(f"| {r['config']} | " + " | ".join(f"{r['passkey_by_length'][n]:.2f}" for n in lengths) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    for path in sys.argv[1:]:
        with open(path) as f:
            print(markdown(json.load(f)))

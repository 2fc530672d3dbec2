"""The tables of docs/ACCURACY.md from an eval/results/*.json file, and paired comparisons of two
configurations' decode KL over the same windows:

    python3 -m turboattn.evaluation.report eval/results/smollm2-135m.json
    python3 -m turboattn.evaluation.report eval/results/FILE.json --paired kv4 kivi4_g64
"""
import json
import random
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


def paired_kl(result, a, b, *, resamples=10000, seed=0):
    """Decode KL of configuration a against b over the same held-out windows: the ratio of their mean KL
    less 1, with a 95% interval from resampling the windows in pairs (the windows, not the positions,
    are the independent samples), and in how many windows a is lower. Needs the per-window KL of results
    written since 'kl_by_window' was added."""
    rows = {r["config"]: r for r in result["rows"]}
    for name in (a, b):
        if name not in rows or "kl_by_window" not in rows[name]["decode"]:
            raise KeyError(f"{name}: not in the results, or written without per-window KL")
    xa, xb = rows[a]["decode"]["kl_by_window"], rows[b]["decode"]["kl_by_window"]
    if len(xa) != len(xb):
        raise ValueError(f"{a} has {len(xa)} windows and {b} {len(xb)}: not the same run")
    if sum(xb) <= 0:
        raise ValueError(f"{b}'s KL is zero (the reference itself?): no ratio to take")
    n = len(xa)
    rng = random.Random(seed)
    boot = []
    for _ in range(resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        boot.append(sum(xa[i] for i in idx) / max(sum(xb[i] for i in idx), 1e-30) - 1)
    boot.sort()
    lo, hi = boot[int(0.025 * resamples)], boot[int(0.975 * resamples) - 1]
    return {"a": a, "b": b, "windows": n, "kl_a": sum(xa) / n, "kl_b": sum(xb) / n, "diff_rel": sum(xa) / sum(xb) - 1,
            "ci95_rel": (lo, hi), "a_lower_in": sum(p < q for p, q in zip(xa, xb))}


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--paired" in args:
        i = args.index("--paired")
        a, b = args[i + 1], args[i + 2]
        path = next(x for j, x in enumerate(args) if j not in (i, i + 1, i + 2))
        with open(path) as f:
            r = paired_kl(json.load(f), a, b)
        print(f"decode KL {a} {r['kl_a']:.5f} vs {b} {r['kl_b']:.5f}: difference {100 * r['diff_rel']:+.2f}% "
              f"(95% interval {100 * r['ci95_rel'][0]:+.2f}% to {100 * r['ci95_rel'][1]:+.2f}%, paired over "
              f"{r['windows']} windows; {a} lower in {r['a_lower_in']})")
    else:
        for path in args:
            with open(path) as f:
                print(markdown(json.load(f)))

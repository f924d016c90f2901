"""Rollouts' share of a refresh and their cost per generated token, in the quality benchmark's warm run (kind
``random40``, seed 0, the library's default schedule), at ``drift_max_new_tokens`` 5 (the benchmark's) and 32.
``decoded`` counts the tokens decoded per row, against ``tokens`` generated up to each row's own EOS (equal when rows
leave the batch at their EOS, as the library's sampler does). Then the two decoders side by side on the same model and
prompts (the warm base model, 64 queries x 4 rollouts, the library's length batches, interleaved repeats): the
library's ``sample_call`` (each row stops at its EOS) against one ``model.generate`` per call (every row decoded until
the call's last EOS). Prints one JSON line per refresh / decoder row and writes them to
``benchmarks/results/rollouts.jsonl``.

    PYTHONPATH=. python benchmarks/overhead_rollouts.py
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import overhead_regimes  # noqa: E402
import quality  # noqa: E402


def measure(max_new_tokens: int) -> list[dict]:
    ns = quality.parse(["--out", overhead_regimes.quality_out()])
    r = overhead_regimes.regime_run(ns, "warm", {"drift_max_new_tokens": max_new_tokens})
    rows = []
    for step, t, tokens, decoded in zip(r["steps"], r["refresh_stage_s"], r["rollout_tokens"], r["rollout_decoded"]):
        rows.append(
            {
                "max_new_tokens": max_new_tokens,
                "step": step,
                "rollouts_s": round(t["rollouts"], 4),
                "share_of_refresh": round(t["rollouts"] / sum(t.values()), 3),
                "tokens": tokens,
                "decoded": decoded,
                "ms_per_generated_token": round(1000 * t["rollouts"] / max(tokens, 1), 4),
            }
        )
    return rows


def decoders(max_new_tokens: int, repeats: int = 3, seed: int = 0) -> dict:
    """``sample_call`` against ``model.generate`` on the same calls and seeds: seconds, tokens, decoded."""
    import time

    import torch
    from transformers import LlamaForCausalLM

    from drift_trainer.cli.toy import build_char_tokenizer
    from drift_trainer.core import rollouts as R
    from drift_trainer.hf.config import DriftArguments

    ns = quality.parse(["--out", overhead_regimes.quality_out()])
    _, queries, _ = quality.kind_data(ns, "random40", seed)
    tok = build_char_tokenizer(os.path.join(overhead_regimes.quality_out(), "tok"))
    model = LlamaForCausalLM.from_pretrained(os.path.join(quality.base_job(ns, seed), "run", "final")).eval()
    args = DriftArguments(drift_max_new_tokens=max_new_tokens, drift_num_rollouts=4, drift_rollout_batch_size=256)
    cfg = R.generation_config(args, tok)
    prompts = [R.tokenize_prompt(tok, queries[i]["prompt"]) for i in range(min(64, len(queries))) for _ in range(4)]
    calls = R.length_batches([len(p) for p in prompts], 256, max_new_tokens)
    paths = {"per_row_eos": R.sample_call, "generate": R._generate_call}
    seconds = {k: [] for k in paths}
    counts = {}
    with torch.no_grad():
        for _ in range(repeats):
            for name, fn in paths.items():
                t0, tokens, decoded = time.perf_counter(), 0, 0
                for c, rows in enumerate(calls):
                    torch.manual_seed(seed + c)
                    ids, mask = R._left_pad([prompts[i] for i in rows], cfg.pad_token_id, "cpu")
                    seqs, steps = fn(model, ids, mask, cfg)
                    tokens, decoded = tokens + sum(len(q) for q in seqs), decoded + sum(steps)
                seconds[name].append(time.perf_counter() - t0)
                counts[name] = (tokens, decoded)
    out = {"max_new_tokens": max_new_tokens, "rollouts": len(prompts), "calls": len(calls), "repeats": repeats}
    for name in paths:
        tokens, decoded = counts[name]
        s = sorted(seconds[name])[len(seconds[name]) // 2]
        out[name] = {
            "s": round(s, 4),
            "tokens": tokens,
            "decoded": decoded,
            "ms_per_token": round(1000 * s / tokens, 4),
        }
    ratios = [g / p for g, p in zip(seconds["generate"], seconds["per_row_eos"])]
    out["speedup_median"] = round(sorted(ratios)[len(ratios) // 2], 3)
    return out


def main() -> None:
    quality._setup()
    lines = []
    for max_new_tokens in (5, 32):
        for row in measure(max_new_tokens):
            lines.append(json.dumps(row))
            print(lines[-1], flush=True)
    for max_new_tokens in (5, 32):
        lines.append(json.dumps({"decoders": decoders(max_new_tokens)}))
        print(lines[-1], flush=True)
    with open(os.path.join(overhead_regimes.quality_out(), "rollouts.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

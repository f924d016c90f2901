"""Rollouts' share of a refresh and their cost per generated token, in the quality benchmark's warm run (kind
``random40``, seed 0, the library's default schedule), at ``drift_max_new_tokens`` 5 (the benchmark's) and 32.
``decoded`` counts the tokens each ``generate`` call ran per row (a call ends when its last row reaches EOS), against
``tokens`` generated up to each row's own EOS. Prints one JSON line per refresh and writes them to
``benchmarks/results/rollouts.jsonl``.

    PYTHONPATH=. python benchmarks/overhead_rollouts.py
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import overhead_regimes  # noqa: E402
import quality  # noqa: E402


def measure(max_new_tokens: int) -> list[dict]:
    from transformers import LlamaForCausalLM

    from drift_trainer.cli.demo import ROLLOUT_OPTIONS, _demo_config
    from drift_trainer.cli.toy import build_char_tokenizer
    from drift_trainer.core.rewards import exact_match
    from drift_trainer.hf.sft_trainer import DriftSFTTrainer

    ns = quality.parse(["--out", overhead_regimes.quality_out()])
    train, queries, _ = quality.kind_data(ns, "random40", 0)
    with tempfile.TemporaryDirectory() as out:
        tok = build_char_tokenizer(os.path.join(out, "tok"))
        model = LlamaForCausalLM.from_pretrained(os.path.join(quality.base_job(ns, 0), "run", "final"))
        opts = {**ROLLOUT_OPTIONS, "drift_num_queries": ns.num_queries, "drift_max_new_tokens": max_new_tokens}
        args = _demo_config(os.path.join(out, "run"), ns.steps, ns.batch_size, ns.sft_lr, 0, 0, False, True, opts)
        trainer = DriftSFTTrainer(
            model=model,
            args=args,
            train_dataset=train,
            query_dataset=queries,
            reward_funcs=exact_match,
            processing_class=tok,
        )
        trainer.train()
        history = trainer.drift_state.history
    rows = []
    for h in history:
        t = h["timings"]
        rows.append(
            {
                "max_new_tokens": max_new_tokens,
                "step": h["step"],
                "rollouts": h["num_rollouts"],
                "rollouts_s": round(t["rollouts"], 4),
                "share_of_refresh": round(t["rollouts"] / sum(t.values()), 3),
                "tokens": h["rollout_tokens"],
                "decoded": h["rollout_decoded"],
                "ms_per_generated_token": round(1000 * t["rollouts"] / max(h["rollout_tokens"], 1), 4),
            }
        )
    return rows


def main() -> None:
    quality._setup()
    lines = []
    for max_new_tokens in (5, 32):
        for row in measure(max_new_tokens):
            lines.append(json.dumps(row))
            print(lines[-1], flush=True)
    with open(os.path.join(overhead_regimes.quality_out(), "rollouts.jsonl"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

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

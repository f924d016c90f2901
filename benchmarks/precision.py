"""Features under mixed precision against a float32 feature pass, path by path.

    python benchmarks/precision.py [--out benchmarks/results/precision.json]

Every path that computes features (or ICA scores) runs once in float32 and once as TRL users run it (bf16 autocast,
the default of SFTConfig / DPOConfig; or bf16 weights, `refine --dtype bfloat16`), on the same tiny Llama (random
init, the same weights), rows and projection. The model does not change between the two (capture runs at learning
rate 0), so the difference is the bf16 rounding of the forward and backward alone. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import quiet_cpu_args  # noqa: E402 (benchmarks/: first on sys.path when run as a script)

from drift_trainer import DriftConfig, DriftSFTTrainer  # noqa: E402
from drift_trainer.cli.toy import (  # noqa: E402
    Corruption,
    addition_dataset,
    build_char_tokenizer,
    build_tiny_llama,
    offline_env,
    query_dataset_from,
)
from drift_trainer.core.feature_pass import FeaturePass  # noqa: E402
from drift_trainer.core.features import ProjectedGradients, select_target_modules  # noqa: E402
from drift_trainer.methods.ica import ica_scores  # noqa: E402
from drift_trainer.methods.pairs import pair_feature_batch, pair_nll_loss  # noqa: E402

K = 16
SEED = 0


def compare(mixed: np.ndarray, fp32: np.ndarray) -> dict:
    """Per-row relative error and cosine of ``mixed`` against ``fp32`` features (rows with a nonzero reference)."""
    mixed, fp32 = np.asarray(mixed, dtype=np.float64), np.asarray(fp32, dtype=np.float64)
    live = np.linalg.norm(fp32, axis=1) > 0
    rel = np.linalg.norm(mixed[live] - fp32[live], axis=1) / np.linalg.norm(fp32[live], axis=1)
    cos = (mixed[live] * fp32[live]).sum(1) / (np.linalg.norm(mixed[live], axis=1) * np.linalg.norm(fp32[live], axis=1))
    return {
        "rows": int(live.sum()),
        "rel_err_median": float(np.median(rel)),
        "rel_err_max": float(rel.max()),
        "cosine_min": float(cos.min()),
    }


def _rows(tokenizer, n=64):
    train = addition_dataset(n, seed=0, corruption=Corruption("random", 0.3))
    out = []
    for r in train:
        p = tokenizer(r["prompt"])["input_ids"]
        c = tokenizer(r["completion"])["input_ids"] + [tokenizer.eos_token_id]
        out.append({"input_ids": p + c, "labels": [-100] * len(p) + c})
    return train, out


def _projector(model):
    return ProjectedGradients(select_target_modules(model), K, 1234)


def autocast_forward(model):
    """As accelerate leaves a mixed-precision model: its forward wrapped in bf16 autocast."""
    model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    return model


def path_feature_pass(tokenizer) -> dict:
    """A refresh's feature pass (DriftSFTTrainer, DriftCallback on a plain Trainer, refine) inside an autocast
    forward."""
    _, rows = _rows(tokenizer)
    ref = build_tiny_llama(tokenizer, seed=SEED)
    fp32 = FeaturePass(_projector(ref), tokenizer.pad_token_id, 16).run(ref, rows)[0]
    model = autocast_forward(build_tiny_llama(tokenizer, seed=SEED))
    mixed = FeaturePass(_projector(model), tokenizer.pad_token_id, 16).run(model, rows)[0]
    return compare(mixed, fp32)


def path_bf16_weights(tokenizer) -> dict:
    """`refine --dtype bfloat16`: the model's weights in bf16 (no autocast)."""
    _, rows = _rows(tokenizer)
    ref = build_tiny_llama(tokenizer, seed=SEED)
    fp32 = FeaturePass(_projector(ref), tokenizer.pad_token_id, 16).run(ref, rows)[0]
    model = build_tiny_llama(tokenizer, seed=SEED).to(torch.bfloat16)
    mixed = FeaturePass(_projector(model), tokenizer.pad_token_id, 16).run(model, rows)[0]
    return compare(mixed, fp32)


def digit_first(prompts, completions, **kwargs):
    """1.0 when a completion starts with a digit: a random model's rollouts get a mix of right and wrong."""
    return [float(str(c)[:1].isdigit()) for c in completions]


def path_capture(tokenizer, **overrides) -> dict:
    """Features captured in DriftSFTTrainer's bf16 training backward (TRL's defaults, learning rate 0). In loss mode
    refreshes every 2 steps set unequal per-example loss weights, which the capture must divide out."""
    train, _ = _rows(tokenizer, 40)
    queries = query_dataset_from(addition_dataset(8, seed=1))
    with tempfile.TemporaryDirectory() as out:
        args = DriftConfig(
            output_dir=out,
            max_steps=10,
            per_device_train_batch_size=4,
            learning_rate=0.0,
            drift_projection_dim=K,
            **quiet_cpu_args(),
            **overrides,
        )
        assert args.bf16
        trainer = DriftSFTTrainer(
            model=build_tiny_llama(tokenizer, seed=SEED),
            args=args,
            train_dataset=train,
            query_dataset=queries,
            reward_funcs=digit_first,
            processing_class=tokenizer,
        )
        trainer.train()
        cb = trainer.drift_callback
        if args.drift_reweight_mode == "loss":
            assert cb.loss_weights is not None and np.std(cb.loss_weights) > 0
        cache = cb.capture.cache
        captured = np.flatnonzero(cache.step >= 0)
        ref = build_tiny_llama(tokenizer, seed=SEED)
        fp32 = FeaturePass(_projector(ref), tokenizer.pad_token_id, 16).run(ref, cb.view.fetch(captured))[0]
        return compare(np.asarray(cache.features[captured]), fp32)


def path_dpo_pairs(tokenizer) -> dict:
    """DRIFT-for-DPO pair features (chosen minus rejected NLL) inside an autocast forward."""
    rows = []
    for r in addition_dataset(32, seed=2):
        p = tokenizer(r["prompt"])["input_ids"]
        good = tokenizer(r["completion"])["input_ids"] + [tokenizer.eos_token_id]
        bad = tokenizer(str(int(r["answer"]) + 1))["input_ids"] + [tokenizer.eos_token_id]
        rows.append({"prompt_ids": p, "chosen_ids": good, "rejected_ids": bad})

    def run(model):
        projector = _projector(model)
        out = []
        for s in range(0, len(rows), 8):
            batch = pair_feature_batch(rows[s : s + 8], tokenizer.pad_token_id, "cpu")
            out.append(projector.compute(model.eval(), batch, loss_fn=pair_nll_loss).features.numpy())
        return np.concatenate(out)

    return compare(
        run(autocast_forward(build_tiny_llama(tokenizer, seed=SEED))), run(build_tiny_llama(tokenizer, seed=SEED))
    )


def path_ica(tokenizer) -> dict:
    """ICA scores (forward passes only) inside an autocast forward: no features, so the score itself is compared."""
    data, holdout = addition_dataset(32, seed=3), addition_dataset(8, seed=4)
    fp32 = ica_scores(build_tiny_llama(tokenizer, seed=SEED), tokenizer, data, holdout)
    mixed = ica_scores(autocast_forward(build_tiny_llama(tokenizer, seed=SEED)), tokenizer, data, holdout)
    err = np.abs(mixed - fp32) / np.abs(fp32).max()
    return {
        "rows": len(fp32),
        "abs_err_max_over_max_score": float(err.max()),
        "pearson": float(np.corrcoef(mixed, fp32)[0, 1]),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/precision.json")
    ns = parser.parse_args(argv)
    offline_env()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tok_dir:
        tokenizer = build_char_tokenizer(tok_dir)
        results = {
            "feature pass, autocast forward (refresh, DriftCallback)": path_feature_pass(tokenizer),
            "feature pass, bf16 weights (refine --dtype bfloat16)": path_bf16_weights(tokenizer),
            "capture in the bf16 training backward (sampler mode)": path_capture(tokenizer, drift_refresh_steps=100),
            "capture in the bf16 training backward (loss mode, weights set)": path_capture(
                tokenizer, drift_reweight_mode="loss", drift_refresh_steps=2, drift_uniform_mix=0.5
            ),
            "DRIFT-for-DPO pair features, autocast forward": path_dpo_pairs(tokenizer),
            "ICA scores, autocast forward": path_ica(tokenizer),
        }
    print("| path | rows | rel. error median | rel. error max | min cosine |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        if "rel_err_max" in r:
            print(
                f"| {name} | {r['rows']} | {r['rel_err_median']:.2e} | {r['rel_err_max']:.2e} | {r['cosine_min']:.5f} |"
            )
        else:
            print(
                f"| {name} | {r['rows']} | max abs err / max score {r['abs_err_max_over_max_score']:.2e} | | "
                f"Pearson {r['pearson']:.5f} |"
            )
    os.makedirs(os.path.dirname(ns.out) or ".", exist_ok=True)
    with open(ns.out, "w") as f:
        json.dump({"torch": torch.__version__, "projection_dim": K, "results": results}, f, indent=2)
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

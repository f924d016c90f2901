"""Overhead section 1, ``throughput``: examples/s of the feature pass over examples/s of a training step.

The feature pass is ``ProjectedGradients.compute`` on the very batches training sees, and ``FeaturePass.run``, which
sorts by length; the training step is forward + backward + AdamW step of the same model, batch size and sequences
[target >= 2.0]. The two sides are interleaved batch by batch, so both see the same machine load. ``FeaturePass
top half``: the same pass with the target modules in the upper half of the blocks only (``drift_target_layers``),
where the lower blocks run without an autograd graph and the backward stops at the lowest target block.

``at TRL's defaults``: the same two sides as an ``SFTConfig`` run takes them by default: the training step with
activation checkpointing on (enabled as ``Trainer`` enables it), gradients clipped to ``max_grad_norm=1.0`` and the
forward under bf16 autocast; the upper-half ``FeaturePass.run`` under the same autocast (a bf16 run's model keeps
accelerate's autocast-wrapped forward, so a refresh's feature pass runs under it; eval mode does not checkpoint).

    PYTHONPATH=. python benchmarks/overhead_throughput.py --quick    # this section alone (prints JSON)
"""

from __future__ import annotations

import time

import numpy as np
import torch
from common import (
    batches_of,
    case_head,
    cases_of,
    load_case,
    median,
    offline_setup,
    run_section,
    tokenizer,
    train_step,
    trl_default_step,
    trl_defaults,
)

from drift_trainer.core.feature_pass import FeaturePass
from drift_trainer.core.features import ProjectedGradients, select_target_modules

offline_setup()


def _time_trl_defaults(cfg, model, opt, fpass_top, batches, rows):
    """Per repeat: seconds of the training steps at TRL's defaults over ``batches`` and of one upper-half
    ``FeaturePass.run`` over ``rows`` under the same bf16 autocast."""
    t_train, t_top = [], []
    with trl_defaults(model):
        model.train()
        trl_default_step(model, opt, batches[0])  # warm-up
        for _ in range(cfg.repeats):
            model.train()
            s = time.perf_counter()
            for b in batches:
                trl_default_step(model, opt, b)
            t_train.append(time.perf_counter() - s)
            s = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                fpass_top.run(model, rows)
            t_top.append(time.perf_counter() - s)
    return t_train, t_top


def _time_interleaved(cfg, model, opt, projector, fpass, batches, rows, fpass_top):
    """Per repeat: seconds of training steps, of ``compute`` on the same batches, of one ``FeaturePass.run`` and of
    one ``FeaturePass.run`` with the upper-half targets."""
    model.train()
    train_step(model, opt, batches[0])  # warm-up (allocates the optimizer state)
    model.eval()
    projector.compute(model, batches[0])
    model.train()
    t_train, t_feat, t_pass, t_top = [], [], [], []
    for _ in range(cfg.repeats):
        tt = tf = 0.0
        for b in batches:  # interleaved batch by batch: both sides see the same machine load
            model.train()
            s = time.perf_counter()
            train_step(model, opt, b)
            tt += time.perf_counter() - s
            model.eval()  # as FeaturePass does
            s = time.perf_counter()
            projector.compute(model, b)
            tf += time.perf_counter() - s
        t_train.append(tt)
        t_feat.append(tf)
        s = time.perf_counter()
        fpass.run(model, rows)
        t_pass.append(time.perf_counter() - s)
        s = time.perf_counter()
        fpass_top.run(model, rows)
        t_top.append(time.perf_counter() - s)
    return t_train, t_feat, t_pass, t_top


def bench_throughput(cfg) -> list[dict]:
    """Feature pass vs training step, examples/s, same model, batches and sequences."""
    out = []
    for model_name, data, length in cases_of(cfg):
        n = cfg.tp_examples
        model, rows = load_case(model_name, data, length, n)
        batches = batches_of(rows, cfg.batch_size)
        projector = ProjectedGradients(select_target_modules(model), cfg.projection_dim)
        fpass = FeaturePass(projector, tokenizer().pad_token_id, cfg.batch_size)
        top = ProjectedGradients(select_target_modules(model, top_layers=0.5), cfg.projection_dim)  # the default
        fpass_top = FeaturePass(top, tokenizer().pad_token_id, cfg.batch_size)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        t_train, t_feat, t_pass, t_top = _time_interleaved(cfg, model, opt, projector, fpass, batches, rows, fpass_top)
        r_compute = [tt / tf for tt, tf in zip(t_train, t_feat)]
        r_pass = [tt / tp for tt, tp in zip(t_train, t_pass)]
        r_top = [tt / tp for tt, tp in zip(t_train, t_top)]
        t_train_trl, t_top_trl = _time_trl_defaults(cfg, model, opt, fpass_top, batches, rows)
        r_trl = [tt / tp for tt, tp in zip(t_train_trl, t_top_trl)]
        out.append(
            {
                **case_head(model_name, model, data, length),
                "mean_tokens": float(np.mean([len(r["input_ids"]) for r in rows])),
                "examples": n,
                "batch_size": cfg.batch_size,
                "projection_dim": cfg.projection_dim,
                "feature_dim": projector.dim,
                "train_ex_per_s": n / median(t_train),
                "features_ex_per_s": n / median(t_feat),
                "feature_pass_ex_per_s": n / median(t_pass),
                "ratio_compute": median(r_compute),
                "ratio_feature_pass": median(r_pass),
                "top_half_modules": len(top.modules),
                "modules": len(projector.modules),
                "feature_pass_top_half_ex_per_s": n / median(t_top),
                "ratio_feature_pass_top_half": median(r_top),
                "ratio_compute_per_repeat": [round(r, 3) for r in r_compute],
                "trl_default_train_ex_per_s": n / median(t_train_trl),
                "trl_default_feature_pass_ex_per_s": n / median(t_top_trl),
                "ratio_trl_defaults": median(r_trl),
                "ratio_trl_defaults_per_repeat": [round(r, 3) for r in r_trl],
            }
        )
        print(
            f"  throughput {model_name:6s} {out[-1]['data']:10s}: train {out[-1]['train_ex_per_s']:.0f} ex/s, "
            f"features {out[-1]['features_ex_per_s']:.0f} ex/s (x{out[-1]['ratio_compute']:.2f}), "
            f"FeaturePass {out[-1]['feature_pass_ex_per_s']:.0f} ex/s (x{out[-1]['ratio_feature_pass']:.2f}), "
            f"top half {out[-1]['feature_pass_top_half_ex_per_s']:.0f} ex/s "
            f"(x{out[-1]['ratio_feature_pass_top_half']:.2f}); at TRL's defaults: train "
            f"{out[-1]['trl_default_train_ex_per_s']:.0f} ex/s, upper half {out[-1]['trl_default_feature_pass_ex_per_s']:.0f} "
            f"ex/s (x{out[-1]['ratio_trl_defaults']:.2f})",
            flush=True,
        )
    return out


if __name__ == "__main__":
    run_section("throughput", bench_throughput, __doc__)

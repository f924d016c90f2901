"""The markdown report of the overhead benchmark (``benchmarks/results/overhead.md``): one table per section.

Each section's part is written by its own ``_md_*`` function and appears only when the results have that section.
"""

from __future__ import annotations

from common import fmt


def _md_throughput(res: dict) -> list[str]:
    L = [
        "## 1. Feature throughput vs training (target >= 2.0)",
        "",
        "| model | params | data (mean tokens) | batch | feature dim | train ex/s | features ex/s | ratio | "
        "FeaturePass, every block ex/s | ratio | FeaturePass, upper half (the default) ex/s (modules) | ratio | "
        "at TRL's defaults: train ex/s | upper half ex/s | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["throughput"]:
        top = r.get("ratio_feature_pass_top_half")
        L.append(
            f"| {r['model']} | {r['params']:,} | {r['data']} ({r['mean_tokens']:.0f}) | {r['batch_size']} | "
            f"{r['feature_dim']} | {r['train_ex_per_s']:.0f} | {r['features_ex_per_s']:.0f} | "
            f"**{r['ratio_compute']:.2f}** | {r['feature_pass_ex_per_s']:.0f} | {r['ratio_feature_pass']:.2f} | "
            + (
                f"{r['feature_pass_top_half_ex_per_s']:.0f} ({r['top_half_modules']} of {r['modules']}) | "
                f"**{top:.2f}** |"
                if top is not None
                else "- | - |"
            )
            + (
                f" {r['trl_default_train_ex_per_s']:.0f} | {r['trl_default_feature_pass_ex_per_s']:.0f} | "
                f"**{r['ratio_trl_defaults']:.2f}** |"
                if "ratio_trl_defaults" in r
                else " - | - | - |"
            )
        )
    L += [
        "",
        "Training = forward + backward + AdamW step on the same padded batches; features = "
        "`ProjectedGradients.compute` on those batches (eval mode, one forward + one `autograd.grad`); "
        "FeaturePass = `FeaturePass.run` over the same rows (length-sorted batches, results stored), with target modules in every block; upper half, the default: "
        "the target modules of the upper half of the blocks only (`drift_target_layers=0.5`), the blocks below run "
        "without an autograd graph.",
        "",
        "At TRL's defaults: the same batches, the training step as an `SFTConfig` run takes it by default "
        "(activation checkpointing on, enabled as `Trainer` enables it; gradients clipped to `max_grad_norm=1.0`; "
        "the forward under bf16 autocast) against the upper-half `FeaturePass.run` under the same autocast (a bf16 "
        "run's model keeps accelerate's autocast-wrapped forward, so a refresh's feature pass runs under it; the "
        "feature pass runs in eval mode, which does not checkpoint). The bare columns before them leave out all "
        "three.",
        "",
    ]
    return L


def _md_exact(res: dict) -> list[str]:
    L = [
        "## 2. Against exact per-example gradients (target >= 10x, same scores)",
        "",
        "| model | examples | hook ex/s | loop ex/s | vmap ex/s | x vs loop | x vs vmap | max rel feature err "
        "(loop / vmap) | max rel score err (loop / vmap) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["exact"]:
        L.append(
            f"| {r['model']} | {r['examples']} | {r['hook_ex_per_s']:.0f} | {r['loop_ex_per_s']:.0f} | "
            f"{r['vmap_ex_per_s']:.0f} | **{r['speedup_vs_loop']:.1f}** | **{r['speedup_vs_vmap']:.1f}** | "
            f"{r['vs_loop']['max_rel_feature_error']:.1e} / {r['vs_vmap']['max_rel_feature_error']:.1e} | "
            f"{r['vs_loop']['max_rel_score_error']:.1e} / {r['vs_vmap']['max_rel_score_error']:.1e} |"
        )
    L += [
        "",
        "Feature error: max over examples of ||phi_hook - phi_exact|| / ||phi_exact||. Score error: max "
        "|s_hook - s_exact| / max |s_exact| for normalised scores s = <phi, d>/||phi|| against a random "
        "direction d. Loop: one forward + `autograd.grad` on the target weights per example (unpadded), then "
        "P_out G P_in^T. vmap: `torch.func.vmap(grad(functional_call))` over the batch (no attention mask: "
        "exact for right padding under causal attention).",
        "",
    ]
    if all("capture_marginal_ms_per_example" in r for r in res["exact"]):
        L += [
            "Captured in training (`drift_capture_features`): the same features filed by the capture hooks "
            "during forward + backward passes of the SFT loss over the same batches (no optimizer step, so the "
            "model is the one the other paths score). Its cost is the marginal time over those passes without "
            "capture, which training pays anyway:",
            "",
            "| model | marginal ms / example | x vs loop | x vs vmap | max rel feature err vs loop | max rel score "
            "err vs loop |",
            "|---|---|---|---|---|---|",
        ]
        L += [
            f"| {r['model']} | {r['capture_marginal_ms_per_example']:.3f} | "
            f"**{fmt(r['capture_speedup_vs_loop'], 1)}** | **{fmt(r['capture_speedup_vs_vmap'], 1)}** | "
            f"{r['capture_vs_loop']['max_rel_feature_error']:.1e} | {r['capture_vs_loop']['max_rel_score_error']:.1e} |"
            for r in res["exact"]
        ]
        L.append("")
    return L


def _md_e2e(res: dict) -> list[str]:
    e = res["e2e"]
    L = [
        "## 3. End to end: DriftSFTTrainer vs drift_enabled=False (target <= 1.15 at the default schedule)",
        "",
        f"Tiny Llama, {e['steps']} steps, batch {e['batch_size']}, {e['repeats']} interleaved repeats, at two "
        "constant learning rates (each DRIFT run paired with the plain run at its rate); all other options at "
        "their defaults (32 queries x 4 rollouts, max 64 new tokens, projection 16, artifacts written, capture "
        "in the last epoch before each refresh with budget 0.1 and a 32-row agreement check whose cosine shrinks "
        "stale rows' scores). The check's mean cosine per refresh is listed; '(full)' marks a refresh that "
        "recomputed every row (`fallback`: `drift_capture_min_agreement=0.9`, the earlier default). `unchecked`: the check "
        "off (`drift_capture_check_rows=0`), the cache trusted however stale: the speed of the fast path alone "
        "(its fidelity is section 6). `warm_*`: from a model first trained "
        f"{res['config'].get('warm_steps', 600)} steps (lr 3e-3) on other, clean addition rows, then fine-tuned "
        "at lr 2e-5, where weights move about 0.1% per step as in LLM fine-tuning; `warm_medium_*` the same on the "
        "2.7M-parameter `medium` toy.",
        "",
        "| variant | lr | train examples | refresh every | capture | rescore budget | max train ex. | refreshes | "
        "rows recomputed per refresh | check agreement per refresh | train() s | refresh s | ratio vs plain run | "
        "ratio within run | stage seconds (last repeat) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in e["table"]:
        st = ", ".join(f"{k} {v:.2f}" for k, v in r["timings"].items())
        rec = r.get("recomputed_per_refresh") or []
        agree = ", ".join(
            "-" if a is None else f"{a:.2f}{' (full)' if f else ''}"
            for a, f in zip(r.get("agreement") or [], r.get("full_fallback") or [])
        )
        L.append(
            f"| {r['variant']} | {r.get('learning_rate', 3e-3):g} | {r['train_examples']} | "
            f"{fmt(r['drift_refresh_steps'])} | {fmt(r.get('capture'))} | "
            f"{fmt(r.get('rescore_budget') if r.get('capture') else None)} | "
            f"{fmt(r['drift_max_train_examples'])} | {r['refreshes']} | "
            f"{', '.join(str(x) for x in rec) or '-'} | {agree or '-'} | {r['wall_s']:.1f} | "
            f"{r['refresh_s']:.1f} | **{r['ratio_vs_plain']:.3f}** | **{r['ratio_internal']:.3f}** | {st} |"
        )
    L += [
        "",
        "Ratio vs plain run: median over repeats of DRIFT train() time / the adjacent plain run's. Ratio "
        "within run: a DRIFT run's train() time / (that time minus its refreshes), which other jobs' load on a "
        "shared machine moves far less; it leaves out DRIFT's per-step costs outside refreshes (sampler, index "
        "column, and the feature capture in every training backward), which the paired ratio includes. "
        "Capture: features of "
        "the trained rows are captured in the training backward and a refresh recomputes only "
        "`drift_rescore_budget` x the rows trained since the previous refresh (stalest first); without capture "
        "every refresh recomputes every row (or a `drift_max_train_examples` block).",
        "",
    ]
    return L


def _md_capture(res: dict) -> list[str]:
    L = [
        "## 3b. Capturing features in the training backward",
        "",
        "A training step (SFT token-mean loss through TRL's fused LM head, AdamW) with and without the capture "
        "hooks (`drift_capture_features`), interleaved, same batches; batch "
        f"{res['capture'][0]['batch_size']}.",
        "",
        "| model | params | data | target modules | plain ms/step | with capture ms/step | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [
        f"| {r['model']} | {r['params']:,} | {r['data']} | {r['target_modules']} | "
        f"{r['plain_ms_per_step']:.2f} | {r['capture_ms_per_step']:.2f} | **{r['ratio']:.3f}** |"
        for r in res["capture"]
    ]
    return [*L, *rows, ""]


def _md_memory(res: dict) -> list[str]:
    m = res["memory"]
    L = [
        "## 4. Memory",
        "",
        f"Feature storage: float32, {m['feature_dim']} features = "
        f"**{m['bytes_per_example']:,} bytes per example** on the `{m['model']}` toy model "
        "(modules x k^2 x 4 bytes).",
        "",
        "| shape | target modules | bytes / example (k=16) | GiB per 100k examples |",
        "|---|---|---|---|",
    ]
    for name, s in m["storage"].items():
        L.append(f"| {name} | {s['modules']} | {s['bytes_per_example']:,} | {s['gib_per_100k_examples']:.2f} |")
    L += [
        "",
        f"Peak memory ({m['measured']}); feature passes over {m['examples']} examples:",
        "",
        "| operation | peak anon RSS above baseline (MiB) | ru_maxrss increase (MiB) |",
        "|---|---|---|",
    ]
    for p in m["probes"]:
        L.append(
            f"| {p['kind']} | {p['peak_anon_delta_bytes'] / 2**20:.1f} | {p['ru_maxrss_delta_bytes'] / 2**20:.1f} |"
        )
    if any(p["kind"].endswith("_trl_defaults") for p in m["probes"]):
        L += [
            "",
            "`*_trl_defaults`: one training step as an `SFTConfig` run takes it by default (activation checkpointing, "
            "clipping, bf16 autocast) and one feature batch of the default upper half under the same autocast, same "
            "batch. The feature pass runs in eval mode, where the decoder layers do not checkpoint: its activations "
            "of the upper blocks are all kept for the backward, while checkpointed training keeps only each block's "
            "input.",
        ]
    L.append("")
    return L


def _md_growth(res: dict) -> list[str]:
    g = res["growth"]
    ts = g["train_size"]
    L = [
        "## 5. Cost growth (one refresh; best of repeats)",
        "",
        "| train examples | " + " | ".join(map(str, ts["x"])) + " |",
        "|---" * (len(ts["x"]) + 1) + "|",
        "| refresh s | " + " | ".join(f"{v:.3f}" for v in ts["refresh_s"]) + " |",
        "| features + influence s | " + " | ".join(f"{v:.3f}" for v in ts["features_influence_s"]) + " |",
        "",
        f"Fit (features + influence): {ts['fit_features']['slope_s_per_unit'] * 1e3:.3f} ms per example, "
        f"intercept {ts['fit_features']['intercept_s']:.3f} s, R^2 {ts['fit_features']['r2']:.4f}, log-log "
        f"exponent {ts['fit_features']['loglog_exponent']:.2f} (1 = linear). Whole refresh: "
        f"{ts['fit_refresh']['slope_s_per_unit'] * 1e3:.3f} ms per example + "
        f"{ts['fit_refresh']['intercept_s']:.2f} s (rollouts), R^2 {ts['fit_refresh']['r2']:.4f}.",
        "",
    ]
    dp = g.get("default_path")
    if dp:
        L += [
            "Default path (features captured in training, stale rows recomputed within the budget): seconds per "
            "refresh in `DriftSFTTrainer` runs at a fixed interval (a refresh every 50 steps of batch 8, 400 rows "
            "trained in between; warmed-up tiny model, lr 2e-5), against the train-set size:",
            "",
            "| train examples | " + " | ".join(map(str, dp["x"])) + " |",
            "|---" * (len(dp["x"]) + 1) + "|",
            "| refresh s | " + " | ".join(f"{v:.3f}" for v in dp["refresh_s"]) + " |",
            "| features + influence s | " + " | ".join(f"{v:.3f}" for v in dp["features_influence_s"]) + " |",
            "| rows recomputed per refresh | " + " | ".join(str(r) for r in dp["recomputed"]) + " |",
            "",
            f"Fit: {dp['fit_refresh']['slope_s_per_unit'] * 1e3:.4f} ms per example (full rescoring above: "
            f"{ts['fit_refresh']['slope_s_per_unit'] * 1e3:.3f}), intercept {dp['fit_refresh']['intercept_s']:.3f} s, "
            f"log-log exponent {dp['fit_refresh']['loglog_exponent']:.2f}.",
            "",
        ]
    p, mm = g["projection"], g["model"]
    L += _sentence(
        f"Projection size ({g['examples_fixed']} examples, tiny model): ",
        (f"k={k} (dim {d}): {v:.3f} s" for k, d, v in zip(p["x"], p["feature_dim"], p["features_influence_s"])),
        f"; fit vs feature dim: log-log exponent {p['fit_vs_dim']['loglog_exponent']:.2f}.",
    )
    L += _sentence(
        f"Model size ({g['examples_fixed']} examples): ",
        (f"{n} ({pp:,} params): {v:.3f} s" for n, pp, v in zip(mm["x"], mm["params"], mm["features_influence_s"])),
        f"; log-log exponent vs params {mm['fit_vs_params']['loglog_exponent']:.2f}.",
    )
    return L


def _sentence(head: str, items, tail: str) -> list[str]:
    """One paragraph: ``head``, the items joined by commas, ``tail``; then a blank line."""
    return [head + ", ".join(items) + tail, ""]


def _md_block(res: dict) -> list[str]:
    L = [
        "## 6. Fast paths vs full rescoring: captured features and block rescoring",
        "",
        "One shared training trajectory per learning rate (the SFT token-mean loss through the fused LM head, "
        "AdamW, constant rate, capture hooks recording each trained row's feature). At each refresh four paths "
        "score the same model with the same rollouts, each keeping its own smoothed scores and weights: **full** "
        "(every row recomputed: the reference), **block** (`drift_max_train_examples`, no capture), "
        "**capture** (the default: cached features, stale rows recomputed within `drift_rescore_budget`=0.1 x rows "
        "trained since the previous refresh, stalest first, and the other stale rows' scores shrunk by the "
        "agreement a 32-row check measures), **fallback** (the same with `drift_capture_min_agreement=0.9`: below "
        "that agreement every row is recomputed; the earlier default) and **unchecked** (the cache with the check "
        "off: what cached features alone give). Capture runs at every step here (the trainer's "
        "`drift_capture_window` would capture only the last epoch before a refresh, fresher still). Pearson/Spearman are against the full path; 'scores' are this refresh's own scores over "
        "the rows both paths scored, 'smoothed' and 'weights' what each path's weights come from.",
        "",
    ]
    for t in res["block"]["trajectories"]:
        L += [
            f"### learning rate {t['learning_rate']:g}",
            "",
            f"{t['train_examples']} train examples, {t['warmup_steps']} warm-up steps, then {t['steps_between']} "
            f"steps of batch {t['batch_size']} between refreshes; blocks of {t['drift_max_train_examples']}.",
            "",
            "| refresh | step | rollout acc. | path | s | rows recomputed / scored | check agreement | pearson "
            "scores | pearson smoothed | spearman smoothed | pearson weights | mean weight of corrupted (full: "
            "this path) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in t["refreshes"]:
            names = ("full", "block", "capture", "capture_fallback", "capture_unchecked")
            L += [_md_block_row(r, name) for name in names if f"{name}_s" in r]
        L.append("")
    return L


def _md_block_row(r: dict, name: str) -> str:
    """The table row of one path at one refresh of section 6."""
    agree = r.get(f"{name}_agreement")
    agree_s = "-" if agree is None else f"{agree:.3f}" + (" (full)" if r.get(f"{name}_fallback") else "")
    scores_s = fmt(r.get(f"{name}_pearson_scores"), 3)
    if name == "capture_unchecked" and "pearson_scores_fresh" in r:
        scores_s += (
            f" (rows trained since the last refresh: {fmt(r.get('pearson_scores_fresh'), 3)}, n="
            f"{r['n_fresh']}; older: {fmt(r.get('pearson_scores_old'), 3)}, n={r['n_old']})"
        )
    return (
        f"| {r['refresh']} | {r['step']} | {r['rollout_accuracy']:.2f} | "
        f"{name.replace('capture_unchecked', 'unchecked').replace('capture_fallback', 'fallback')} | "
        f"{r[f'{name}_s']:.2f} | "
        f"{r[f'{name}_recomputed']} / {r[f'{name}_scored']} | {agree_s} | "
        f"{'-' if name == 'full' else scores_s} | {fmt(r.get(f'{name}_pearson_smoothed'), 3)} | "
        f"{fmt(r.get(f'{name}_spearman_smoothed'), 3)} | {fmt(r.get(f'{name}_pearson_weights'), 3)} | "
        f"{fmt(r.get('corrupted_mean_weight_full') if name == 'full' else r.get(f'{name}_corrupted_mean_weight'), 3)} |"
    )


def _md_regimes(res: dict) -> list[str]:
    g = res["regimes"]
    L = [
        "## 3c. End to end in the quality benchmark's regimes (target: warm <= 1.10 at the default schedule; "
        "scratch <= 1.5)",
        "",
        f"`benchmarks/quality.py`'s runs (kind `{g['kind']}`, seed {g['seed']}): `warm` fine-tunes its clean base "
        "model at its gentle rate for 200 steps, `scratch` trains from random init at the high rate for 1000; batch "
        "64 over 1,000 rows. `drift`: the library's defaults (a refresh every 100 steps); `dense`: the quality "
        "benchmark's schedule (from step 40, or 600 from scratch, every 40); `full`: `drift_capture_features=False`. "
        f"Time of `train()` alone, {g['repeats']} interleaved repeats (scratch: 2).",
        "",
        "| variant | steps | refreshes | rows recomputed per refresh | agreement | train() s | ratio vs plain | "
        "ratio within run | refresh s | stage seconds (last repeat) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in g["table"]:
        agree = ", ".join("-" if a is None else f"{a:.2f}" for a in r["agreement"]) or "-"
        stages = ", ".join(f"{k} {v:.2f}" for k, v in r["stages"].items())
        L.append(
            f"| {r['variant']} | {r['steps']} | {r['refreshes']} | {r['recomputed_per_refresh'] or '-'} | {agree} | "
            f"{r['wall_s']:.1f} | **{r['ratio_vs_plain']:.3f}** | {r['ratio_internal']:.3f} | {r['refresh_s']:.2f} | "
            f"{stages} |"
        )
    L.append("")
    return L


def markdown(res: dict, command: str) -> str:
    L = [
        "# DRIFT overhead benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {res['machine']}. Wall time: {res['total_s']:.0f} s. Ratios are medians of per-repeat ratios, "
        "the two sides interleaved in one process.",
        "",
    ]
    if "throughput" in res:
        L += _md_throughput(res)
    if "exact" in res:
        L += _md_exact(res)
    if "e2e" in res:
        L += _md_e2e(res)
    if "regimes" in res:
        L += _md_regimes(res)
    if "capture" in res:
        L += _md_capture(res)
    if "memory" in res:
        L += _md_memory(res)
    if "growth" in res:
        L += _md_growth(res)
    if "block" in res and "trajectories" in res["block"]:
        L += _md_block(res)
    return "\n".join(L)

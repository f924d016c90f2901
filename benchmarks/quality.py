"""Quality benchmark: is DRIFT ever worse than plain SFT, and where is it clearly better? (see README.md here)

Every configuration is paired with plain SFT on the same seed: the same base model, the same data and corruption, and
the same batch order up to the first refresh (``DriftSampler`` yields accelerate's own permutation while its weights
are uniform). Reported per regime and kind, over ``--seeds`` seeds (8 by default):

- the mean paired difference in final test accuracy against plain SFT and against each baseline, with a 95% bootstrap
  CI over seeds, and on how many seeds DRIFT is below plain;
- the share of the gap between plain SFT and the oracle that a configuration closes, on seed means;
- the weight AUROC: the final weights separating clean (positive) from corrupted rows.

Kinds: ``none`` (clean data), ``random10`` / ``random40`` (10% / 40% of rows get a random wrong answer),
``systematic`` (half of the carrying pairs lose their carry: a plausible wrong rule), ``format`` (half of the rows
answer ``#<n>``: learnable, judged wrong), and ``target``: a mixture of addition, subtraction and multiplication in
equal shares, with queries and test prompts from addition only (the LESS setting); its oracle trains on the addition
rows and its "corrupted" rows are the off-target ones.

Regimes: ``warm`` (primary): a base model is first trained on clean addition (rows disjoint from every SFT set), then
fine-tuned at the gentler ``--sft-lr`` for ``--steps``. ``scratch`` (secondary): random init, ``--scratch-steps``.
``icl``: as ``warm``, but each base-training row comes after 0 to ``--icl-demos`` other clean rows in the same
sequence (examples back to back, as pretraining text has them), so text after other examples is in distribution. ICA
needs that: it scores a row by its log-probability after holdout demonstrations, and a base model that has seen one
example per sequence loses every prediction after the first EOS (``benchmarks/ica_sft.py``, ``results/ica_sft.md``).

Configurations: ``plain``; ``clean`` (the oracle: plain SFT on the clean rows only); ``drift`` (the library's
defaults); the candidates in ``VARIANTS`` (each a set of ``drift_*`` options on top of the defaults: weighting rules,
sampling, the loss hybrid and its gate, split-half shrinkage, a stable target, more contrast rollouts, the
preconditioners); ``ica`` (SFT ICA, ``drift_method="ica"``, its holdout the queries with their answers); the baselines ``loss``, ``cosine``, ``off_policy``, ``random`` (each a ``drift_scorer`` at the
library's default weighting). Runs are independent jobs written to ``{out}/runs/*.json`` as
they finish: rerunning skips finished jobs, and ``--aggregate-only`` rebuilds the tables.

    PYTHONPATH=. python benchmarks/quality.py              # full run, about an hour on 2 cores
    PYTHONPATH=. python benchmarks/quality.py --quick      # 3 seeds, writes to /tmp/drift-quality-quick
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from quality_stats import aggregate, kept_bases, save_kept_bases  # noqa: E402 (benchmarks/ is first on sys.path)

KINDS = ("none", "random10", "random40", "systematic", "format", "target")
CORRUPTION = {  # kind -> (toy corruption, fraction of rows drawn for it)
    "none": ("none", 0.0),
    "random10": ("random", 0.1),
    "random40": ("random", 0.4),
    "systematic": ("systematic", 0.5),
    "format": ("format", 0.5),
}
BASELINES = ("loss", "cosine", "off_policy", "random")
# The library's defaults before this benchmark chose the loss hybrid and systematic sampling: every candidate measured
# against them carries them explicitly, so its recorded runs keep their meaning under today's defaults.
V0 = {"drift_loss_mix": 0.0, "drift_sampling": "replacement"}
VARIANTS = {  # configuration -> drift_* options on top of the library's defaults
    "drift": {},  # the defaults before the harm gate: drift_loss_mix=1.0, drift_sampling="systematic", no gate
    "drift_v0": dict(V0),  # the earlier defaults: influence only, draws with replacement
    "drift_replacement": {"drift_sampling": "replacement"},  # = the earlier `drift_loss1`
    "drift_ordered": {"drift_sampling": "ordered"},  # the systematic counts, in plain SFT's order
    # less weight to the rows with helpful evidence (fewer repeats of them) at today's defaults: a lower cap, or the
    # `demote` rule (weight 1 above -threshold standard deviations), with the loss hybrid
    "drift_clip2": {"drift_weight_clip": 2.0},
    "drift_clip3": {"drift_weight_clip": 3.0},
    "drift_clip2_t2": {"drift_weight_clip": 2.0, "drift_softmax_temperature": 2.0},
    "drift_demote_loss": {"drift_weighting": "demote"},
    "drift_demote0_loss": {"drift_weighting": "demote", "drift_demote_threshold": 0.0},
    # the fast path against its reference: every row recomputed at every refresh (no captured features), and the
    # earlier capture default (capture at every step; below an agreement of 0.9 every row is recomputed)
    "drift_full": {"drift_capture_features": False},
    "drift_fallback": {"drift_capture_window": None, "drift_capture_min_agreement": 0.9},
    # cheaper features: the target modules of the upper blocks only (2 of the toy's 3; the last one)
    "drift_top_half": {"drift_target_layers": 0.5},  # the default since the upper half tied every block
    "drift_all_blocks": {"drift_target_layers": None},  # the default before: target modules in every block
    "drift_top1": {"drift_target_layers": 1},
    "drift_demote": {**V0, "drift_weighting": "demote"},
    "drift_systematic": {**V0, "drift_sampling": "systematic"},
    "drift_demote_systematic": {**V0, "drift_weighting": "demote", "drift_sampling": "systematic"},
    # gentler versions of the softmax weighting
    "drift_t2": {**V0, "drift_softmax_temperature": 2.0},
    "drift_mix30": {**V0, "drift_uniform_mix": 0.3},
    "drift_t2_systematic": {**V0, "drift_softmax_temperature": 2.0, "drift_sampling": "systematic"},
    # split-half shrinkage, a stable target, more contrast, the preconditioners. The `drift_reliable*` rows ran before
    # the shrink was fixed: it scaled the standardised scores, which the weighting rule standardised again, so it only
    # set how much each refresh moved the score average. `drift_shrink` runs the fixed option (the weights move
    # `reliability` of the way from 1) at today's defaults.
    "drift_reliable": {**V0, "drift_reliability_shrink": True},
    "drift_shrink": {"drift_reliability_shrink": True},
    # per-query contrast: each rollout signed by its reward minus its query's mean, so the direction a query's
    # rollouts share (its prompt, the answer format) cancels and only what separates its right and wrong answers counts
    "drift_advantage": {"drift_signing": "advantage"},
    # each query's contrast anchored at its reference answer (reference minus the mean of its wrong rollouts), so the
    # many all-wrong queries of a weak model count too
    "drift_anchored": {"drift_scorer": "drift_anchored"},
    # the loss hybrid gated by its agreement with the influence, at today's defaults (measured before only with
    # replacement draws and no loss hybrid by default: `drift_loss1_gated`)
    "drift_gated": {"drift_loss_gate": True},
    # weight taken only from a separate low group of a two-Gaussian mixture of the scores, at today's defaults
    "drift_mixture": {"drift_weighting": "mixture"},
    # and in plain SFT's order: where the mixture leaves weights near 1, the batches stay plain SFT's
    "drift_mixture_ordered": {"drift_weighting": "mixture", "drift_sampling": "ordered"},
    # the control: seeded random scores through the mixture rule, which leaves their weights near 1 (the draw after
    # each refresh is no longer plain SFT's permutation, and little else changes); on clean data only
    "random_mixture": {"drift_scorer": "random", "drift_weighting": "mixture"},
    # the mixture rule on the hybrid of the two terms' normal scores (ranks), so the loss's long tail of hard rows
    # alone cannot put a row in the low group
    "drift_mixture_ranks": {"drift_weighting": "mixture", "drift_loss_ranks": True},
    # drift_reference_bound: rows whose loss exceeds every query's reference answer's lose their weight; `flat` keeps
    # every other row at 1 (the scores move nothing else), `mixture` adds the scores' low group
    "bound_flat": {"drift_weighting": "flat", "drift_reference_bound": True},
    "drift_bound_mixture": {"drift_weighting": "mixture", "drift_reference_bound": True},
    # today's defaults: drift_harm_gate=True, weights stay 1 (plain SFT's batches) until the start model or a refresh
    # finds harm (train losses beyond every reference answer's, or validation accuracy below the start model's, each
    # at p < 0.01)
    "drift_harm": {"drift_harm_gate": True},
    # the gate's loss test also above the 2nd, 4th and 8th largest reference loss (Bonferroni over the four)
    "drift_harm_rank8": {"drift_harm_gate": True, "drift_harm_max_rank": 8},
    "drift_harm_anchored": {"drift_harm_gate": True, "drift_scorer": "drift_anchored"},  # the gate, anchored contrast
    "drift_target_ema": {**V0, "drift_target_ema": 0.5},
    "drift_contrast4": {**V0, "drift_contrast_rollouts": 4},
    "drift_kronecker": {**V0, "drift_preconditioner": "kronecker"},
    "drift_fisher": {**V0, "drift_preconditioner": "fisher"},
    "drift_adam": {**V0, "drift_preconditioner": "adam"},
    # the hybrid with loss, with replacement draws unless named
    "drift_reliable_loss1": {**V0, "drift_reliability_shrink": True, "drift_loss_mix": 1.0},
    "drift_reliable_loss1_systematic": {
        **V0,
        "drift_reliability_shrink": True,
        "drift_loss_mix": 1.0,
        "drift_sampling": "systematic",
    },
    "drift_loss1_t2": {**V0, "drift_loss_mix": 1.0, "drift_softmax_temperature": 2.0},
    "drift_loss05": {**V0, "drift_loss_mix": 0.5},
    "drift_loss2": {**V0, "drift_loss_mix": 2.0},
    "drift_loss1_gated": {**V0, "drift_loss_mix": 1.0, "drift_loss_gate": True},
    "drift_loss2_gated": {**V0, "drift_loss_mix": 2.0, "drift_loss_gate": True},
    # SFT ICA (arXiv 2510.14459): loss weights from in-context scores against the queries with their right answers
    # (the same validation examples DRIFT judges its rollouts on), computed once at the start (the paper's default)
    "ica": {"drift_method": "ica"},
    # the baselines, at the softmax weighting and the draws with replacement they were measured with
    **{b: {"drift_scorer": b, "drift_sampling": "replacement"} for b in BASELINES},
}
# Every configuration that does not set the harm gate was measured before it became the default: each carries it off,
# so its recorded runs keep their meaning under today's defaults.
VARIANTS = {c: (o if "drift_harm_gate" in o else {"drift_harm_gate": False, **o}) for c, o in VARIANTS.items()}
CONFIGS = ("plain", "clean", *VARIANTS)
# the default run (about an hour on 2 cores): the defaults, the earlier defaults, their one-option neighbours and the
# baselines; `--configs all` runs every candidate above
MAIN_CONFIGS = (
    "plain",
    "clean",
    "drift_harm",
    "drift",
    "drift_full",
    "drift_v0",
    "drift_replacement",
    "drift_systematic",
    *BASELINES,
)
REGIMES = ("warm", "scratch", "icl")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    p.add_argument("--regimes", default="warm", help=f"Comma-separated, of {REGIMES}.")
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--configs", default=",".join(MAIN_CONFIGS), help="Comma-separated, or `all` (every candidate).")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="Run only seeds first-seed .. seeds-1 (the table still aggregates every finished seed below --seeds).",
    )
    p.add_argument("--workers", type=int, default=2, help="Parallel worker processes (1 torch thread each).")
    p.add_argument("--base-steps", type=int, default=800, help="Steps of the clean base-model training per seed.")
    p.add_argument("--steps", type=int, default=200, help="Warm regime: SFT steps from the base model.")
    p.add_argument("--scratch-steps", type=int, default=1000, help="Scratch regime: SFT steps from random init.")
    p.add_argument("--first-refresh", type=int, default=40, help="Warm regime: step of the first refresh.")
    p.add_argument("--scratch-first-refresh", type=int, default=600)
    p.add_argument("--refresh", type=int, default=40, help="Steps between refreshes.")
    p.add_argument(
        "--icl-demos", type=int, default=3, help="icl regime: most clean rows before each base-training row."
    )
    p.add_argument("--num-train", type=int, default=1000)
    p.add_argument("--num-test", type=int, default=300)
    p.add_argument("--num-queries", type=int, default=64)
    p.add_argument("--hidden-size", type=int, default=96)
    p.add_argument("--num-layers", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="Base-model and scratch learning rate.")
    p.add_argument("--sft-lr", type=float, default=1e-3, help="Warm regime: the gentler fine-tuning rate.")
    p.add_argument("--bootstrap", type=int, default=10000, help="Bootstrap resamples of the paired differences.")
    p.add_argument("--quick", action="store_true", help="3 seeds, writes to /tmp/drift-quality-quick.")
    p.add_argument("--aggregate-only", action="store_true")
    ns = p.parse_args(argv)
    if ns.configs == "all":
        ns.configs = ",".join(CONFIGS)
    if ns.quick:
        ns.seeds = 3
        if ns.out == p.get_default("out"):
            ns.out = "/tmp/drift-quality-quick"
    return ns


def _setup():
    from drift_trainer.cli.toy import offline_env

    offline_env()
    import logging
    import warnings

    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    logging.getLogger("drift_trainer").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def _model_kwargs(ns, lr: float):
    return dict(hidden_size=ns.hidden_size, num_layers=ns.num_layers, lr=lr, batch_size=ns.batch_size)


def kind_data(ns, kind: str, seed: int):
    """``(train, queries, test)`` of ``kind``: train rows with a ``corrupted`` column, clean addition queries and
    held-out addition test prompts (none of them in train or queries)."""
    from drift_trainer.cli.demo import make_data
    from drift_trainer.cli.toy import addition_dataset, mixture_dataset, query_dataset_from

    if kind != "target":
        corruption, fraction = CORRUPTION[kind]
        return make_data(corruption, fraction, ns.num_train, ns.num_test, ns.num_queries, seed)
    train = mixture_dataset(ns.num_train, seed=1000 + seed)
    queries = query_dataset_from(addition_dataset(ns.num_queries, seed=2000 + seed))
    seen = set(train["prompt"]) | set(queries["prompt"])
    test = addition_dataset(ns.num_test * 2, seed=3000 + seed)
    keep = [i for i, p in enumerate(test["prompt"]) if p not in seen][: ns.num_test]
    return train, queries, query_dataset_from(test.select(keep))


def with_demos(data, max_demos: int, eos: str, seed: int):
    """``data`` with 0 to ``max_demos`` other rows (``prompt + completion + eos`` each, drawn from ``data``) put
    before each prompt: a row after other examples, as ICA's demonstrations come."""
    import random

    rng = random.Random(seed)
    texts = [p + c + eos for p, c in zip(data["prompt"], data["completion"])]
    prompts = []
    for i, p in enumerate(data["prompt"]):
        k = rng.randint(0, max_demos)
        others = [j for j in rng.sample(range(len(texts)), k + 1) if j != i][:k]
        prompts.append("".join(texts[j] for j in others) + p)
    return data.remove_columns("prompt").add_column("prompt", prompts)


def ica_holdout(queries):
    """ICA's holdout: the queries with their right answers as completions (what DRIFT judges its rollouts by)."""
    return queries.map(lambda row: {"completion": row["answer"]})


def base_job(ns, seed: int, icl: bool = False) -> str:
    """Train (or reuse) the clean base model of ``seed`` (warm regime; ``icl``: the icl regime's, each row after 0 to
    ``--icl-demos`` other rows); returns its directory."""
    _setup()
    from drift_trainer.cli.demo import make_data, run_one
    from drift_trainer.cli.toy import addition_dataset, build_char_tokenizer

    path = os.path.join(ns.out, "base_icl" if icl else "base", f"seed{seed}")
    if os.path.exists(os.path.join(path, "base.json")):
        return path
    tok = build_char_tokenizer(os.path.join(path, "tokenizer"))
    _, _, test = make_data("none", 0.0, ns.num_train, ns.num_test, ns.num_queries, seed)
    base_train = addition_dataset(ns.num_train * 2, seed=9000 + seed)  # clean, other rows than the SFT sets
    if icl:
        base_train = with_demos(base_train, ns.icl_demos, tok.eos_token, seed)
    r = run_one(
        "base",
        train=base_train,
        queries=None,
        test=test,
        tokenizer=tok,
        output_dir=os.path.join(path, "run"),
        steps=ns.base_steps,
        seed=seed,
        drift=False,
        progress=False,
        save_model=True,
        **_model_kwargs(ns, ns.lr),
    )
    with open(os.path.join(path, "base.json"), "w") as f:
        json.dump({"seed": seed, "test_accuracy": r.final_accuracy, "seconds": r.seconds}, f)
    return path


def check_base(ns, regime: str, seed: int, acc: float) -> None:
    """Record the base model of ``seed`` in ``base_accuracy.json``, refusing one that differs from the base its
    finished runs were made from.

    Base models are not committed and their training does not reproduce across machines and library versions (the
    same seed has trained to 0.703 and to 0.723). A base retrained here whose test accuracy differs from the one kept
    in ``base_accuracy.json`` is another model: the finished runs of that seed were made from the kept one, so new
    runs would not be paired with them."""
    kept = kept_bases(ns.out)
    before = kept.get(regime, {}).get(str(seed))
    runs = os.path.join(ns.out, "runs")
    finished = (
        [n for n in os.listdir(runs) if n.startswith(f"{regime}-") and f"-seed{seed}-" in n]
        if os.path.isdir(runs)
        else []
    )
    if before is not None and abs(before - acc) < 1e-9:
        return
    if before is not None and finished:
        raise SystemExit(
            f"The base model of {regime} seed {seed} was retrained here to test accuracy {acc:.3f}, but the "
            f"{len(finished)} finished {regime} runs of that seed in {runs} were made from a base at {before:.3f} "
            f"(base_accuracy.json): new runs would not be paired with them. Run new configurations on seeds without "
            f"finished runs (--first-seed), give --out a fresh directory (and run plain and the baselines there too), "
            f"or move that seed's finished runs aside to rerun them all."
        )
    kept.setdefault(regime, {})[str(seed)] = acc
    save_kept_bases(ns.out, kept)


def job_name(regime: str, kind: str, seed: int, config: str) -> str:
    return f"{regime}-{kind}-seed{seed}-{config}"


def run_file(ns, *job) -> str:
    """Where the result of ``job`` (regime, kind, seed, config) is written; a job whose file exists is finished."""
    return os.path.join(ns.out, "runs", f"{job_name(*job)}.json")


def run_job(ns, regime: str, kind: str, seed: int, config: str) -> dict:
    _setup()
    from drift_trainer.cli.demo import ROLLOUT_OPTIONS, run_one
    from drift_trainer.cli.toy import build_char_tokenizer

    name = job_name(regime, kind, seed, config)
    out_file = run_file(ns, regime, kind, seed, config)
    if os.path.exists(out_file):
        with open(out_file) as f:
            return json.load(f)
    tok = build_char_tokenizer(os.path.join(ns.out, "tok", name))
    train, queries, test = kind_data(ns, kind, seed)
    warm = regime in ("warm", "icl")
    base = "base_icl" if regime == "icl" else "base"
    common = dict(
        queries=queries,
        test=test,
        tokenizer=tok,
        output_dir=os.path.join(ns.out, "work", name),
        steps=ns.steps if warm else ns.scratch_steps,
        seed=seed,
        progress=False,
        init_from=os.path.join(ns.out, base, f"seed{seed}", "run", "final") if warm else None,
        warmup_steps=0 if warm else None,
        **_model_kwargs(ns, ns.sft_lr if warm else ns.lr),
    )
    if config == "plain":
        r = run_one(config, train=train, drift=False, **common)
    elif config == "clean":
        clean_rows = [i for i, c in enumerate(train["corrupted"]) if not c]
        r = run_one(config, train=train.select(clean_rows), drift=False, **common)
    else:
        holdout = ica_holdout(queries) if VARIANTS[config].get("drift_method") == "ica" else None
        r = run_one(
            config,
            train=train,
            drift=True,
            holdout=holdout,
            drift_first_refresh_step=ns.first_refresh if warm else ns.scratch_first_refresh,
            drift_refresh_steps=ns.refresh,
            drift_num_queries=ns.num_queries,
            **ROLLOUT_OPTIONS,
            **VARIANTS[config],
            **common,
        )
    rec = {"regime": regime, "kind": kind, "seed": seed, "config": config, **r.to_dict()}
    os.makedirs(os.path.dirname(out_file), exist_ok=True)
    with open(out_file, "w") as f:
        json.dump(rec, f, indent=1)
    return rec


def jobs_of(ns) -> list[tuple]:
    jobs = []
    for regime in ns.regimes.split(","):
        for seed in range(ns.first_seed, ns.seeds):
            for kind in ns.kinds.split(","):
                for config in ns.configs.split(","):
                    if config == "clean" and kind == "none":
                        continue  # the oracle of clean data is plain SFT itself
                    jobs.append((regime, kind, seed, config))
    return jobs


def main(argv=None) -> int:
    ns = parse(argv)
    given = sys.argv[1:] if argv is None else argv
    command = "PYTHONPATH=. python benchmarks/quality.py " + " ".join(a for a in given if a != "--aggregate-only")
    os.makedirs(ns.out, exist_ok=True)
    if not ns.aggregate_only:
        started = time.perf_counter()
        jobs = [j for j in jobs_of(ns) if not os.path.exists(run_file(ns, *j))]
        with ProcessPoolExecutor(max_workers=ns.workers) as pool:
            for regime in [r for r in ns.regimes.split(",") if r in ("warm", "icl")]:
                # a base model only for the seeds with a job left: finished runs need none (bases are not committed)
                icl = regime == "icl"
                pending = sorted({j[2] for j in jobs if j[0] == regime})
                for seed, fut in [(s, pool.submit(base_job, ns, s, icl)) for s in pending]:
                    with open(os.path.join(fut.result(), "base.json")) as f:
                        acc = json.load(f)["test_accuracy"]
                        print(f"base seed {seed}{' (icl)' * icl}: test accuracy {acc:.3f}", flush=True)
                    check_base(ns, regime, seed, acc)
            futs = {pool.submit(run_job, ns, *j): j for j in jobs}
            for i, fut in enumerate(as_completed(futs), 1):
                r = fut.result()
                wa = r.get("weight_auroc") or [float("nan")]
                print(
                    f"[{i}/{len(jobs)} {time.perf_counter() - started:.0f}s] {r['regime']} {r['kind']} seed "
                    f"{r['seed']} {r['config']}: acc {r['final_accuracy']:.3f} weight AUROC {wa[-1]:.2f} "
                    f"({r['seconds']:.0f}s)",
                    flush=True,
                )
                if i % 20 == 0:
                    aggregate(ns, command)
    result = aggregate(ns, command)
    print(open(os.path.join(ns.out, "quality.md")).read())
    return 0 if result["table"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

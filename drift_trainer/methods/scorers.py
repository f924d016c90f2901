"""Scorers: DRIFT, its ablations and the baselines it is compared with, all on the same feature pipeline.

``drift_scorer`` picks one (see ``DriftArguments.drift_scorer``). A refresh always samples rollouts (their accuracy is
logged for every scorer) and always runs the train feature pass (features, gradient norms and losses); a scorer decides

1. the signs of the rollouts (:func:`scorer_signs`),
2. the target direction ``G`` in the projected gradient space (:func:`scorer_target`),
3. how raw inner products, norms and losses become scores (:func:`scorer_scores`).

=================  ==========================================================  =====================================
scorer             target ``G``                                                score of train example ``i``
=================  ==========================================================  =====================================
``drift``          signed sum of normalised rollout features                   ``drift_debias`` of ``<H^-1 G, phi_i>``
``drift_unsigned`` correct rollouts only, each +1/#correct                     as ``drift``
``drift_raw``      as ``drift``                                                ``<H^-1 G, phi_i>`` (debias ``none``)
``off_policy``     mean normalised feature of the reference answers            ``<H^-1 G, phi_i>`` (raw: classic IF)
``cosine``         mean normalised feature of the reference answers            ``<G, phi_i / ||phi_i||>`` (mean cos)
``loss``           none                                                        ``-loss_i``
``random``         none                                                        seeded standard normal
``uniform``        none                                                        0, and weights stay exactly 1
=================  ==========================================================  =====================================

``off_policy`` is the classic influence baseline the paper argues against on both counts: off-policy targets and no
debiasing (with ``drift_debias='normalize'`` and the identity preconditioner it would equal ``cosine``). Its
on-policy counterpart is ``drift_raw``, so ``drift_raw`` vs ``off_policy`` isolates on-policy targets, and ``drift``
vs ``drift_raw`` isolates debiasing.

Reference answers come from the query dataset's ``answer`` column: the completion ``answer`` + EOS after the
query's prompt, tokenized exactly as a rollout (so a correct rollout and its reference answer have the same feature).
"""

from __future__ import annotations

import numpy as np

from drift_trainer.core.features import IGNORE_INDEX
from drift_trainer.core.influence import debias_raw, signed_target
from drift_trainer.core.rollouts import tokenize_prompt

ROLLOUT_SCORERS = ("drift", "drift_unsigned", "drift_raw")
REFERENCE_SCORERS = ("off_policy", "cosine")
REFERENCE_COLUMN = "answer"


def scorer_of(args) -> str:
    return getattr(args, "drift_scorer", "drift") or "drift"


def check_scorer_inputs(args, query_dataset) -> None:
    """Raise before training when the scorer needs a column the query dataset lacks."""
    if scorer_of(args) in REFERENCE_SCORERS and REFERENCE_COLUMN not in getattr(query_dataset, "column_names", []):
        raise ValueError(
            f"drift_scorer={scorer_of(args)!r} scores towards the queries' reference answers, but the query_dataset "
            f"has no `{REFERENCE_COLUMN}` column (columns: {getattr(query_dataset, 'column_names', None)}). Add one, or "
            "use drift_scorer='drift'."
        )


def scorer_signs(args, rewards: np.ndarray, signs: np.ndarray, contrast: bool) -> tuple[np.ndarray, bool]:
    """Rollout signs and whether the refresh may change the weights, for the configured scorer.

    ``drift``/``drift_raw``: the signing rule's signs unchanged. ``drift_unsigned``: +1/#correct on every correct
    rollout, 0 on wrong ones (needs at least one correct rollout). Other scorers ignore rollouts: signs 0, always
    "contrast" (their scores do not depend on rollouts).
    """
    scorer = scorer_of(args)
    rewards = np.asarray(rewards, dtype=np.float64)
    if scorer in ("drift", "drift_raw"):
        return signs, contrast
    if scorer == "drift_unsigned":
        correct = rewards >= args.drift_reward_threshold
        out = np.where(correct, 1.0 / max(int(correct.sum()), 1), 0.0)
        return out, bool(correct.any())
    return np.zeros_like(rewards), True


def reference_rows(tokenizer, query_dataset, query_rows: list[int]) -> list[dict]:
    """One tokenized row per query: its prompt (masked) and its reference answer + EOS (labelled)."""
    rows = []
    eos = tokenizer.eos_token_id
    for qi in query_rows:
        row = query_dataset[int(qi)]
        prompt_ids = tokenize_prompt(tokenizer, row["prompt"])
        answer = row[REFERENCE_COLUMN]
        if isinstance(answer, list):  # messages
            answer = answer[-1]["content"] if answer and isinstance(answer[-1], dict) else str(answer)
        ids = list(tokenizer(text=str(answer), add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
        rows.append({"input_ids": prompt_ids + ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + ids})
    return rows


def scorer_target(args, *, feature_pass, model, tokenizer, query_dataset, query_rows, rollouts, signs, contrast, dim):
    """The target ``G`` (dim,) of the configured scorer (zeros where the scorer has none)."""
    scorer = scorer_of(args)
    target = np.zeros(dim)
    if scorer in ROLLOUT_SCORERS:
        live = np.flatnonzero(signs != 0)
        if contrast and len(live):
            r_rows = rollouts.training_rows()
            rfeat, _, _ = feature_pass.run(model, [r_rows[j] for j in live])
            target = signed_target(rfeat, signs[live])
    elif scorer in REFERENCE_SCORERS:
        check_scorer_inputs(args, query_dataset)
        rows = reference_rows(tokenizer, query_dataset, query_rows)
        if rows:
            rfeat, _, _ = feature_pass.run(model, rows)
            target = signed_target(rfeat, np.full(len(rows), 1.0 / len(rows)))
    return target


def uses_preconditioner(args) -> bool:
    """``cosine`` is LESS-style (no preconditioner); scorers without a target have nothing to precondition."""
    return args.drift_preconditioner == "fisher" and scorer_of(args) in ROLLOUT_SCORERS + ("off_policy",)


def scorer_scores(args, raw: np.ndarray, norms: np.ndarray, losses: np.ndarray, seed: int) -> np.ndarray:
    """Scores of the train rows from raw inner products ``<H^-1 G, phi_i>``, feature norms and losses."""
    scorer = scorer_of(args)
    live = np.asarray(norms) > 0
    if scorer in ("drift", "drift_unsigned"):
        return debias_raw(raw, norms, args.drift_debias, args.drift_norm_exponent)
    if scorer in ("drift_raw", "off_policy"):
        return debias_raw(raw, norms, "none")
    if scorer == "cosine":
        return debias_raw(raw, norms, "normalize", 1.0)
    if scorer == "loss":
        return np.where(live, -np.nan_to_num(np.asarray(losses, dtype=np.float64), nan=0.0), 0.0)
    if scorer == "random":
        return np.where(live, np.random.default_rng(seed).standard_normal(len(raw)), 0.0)
    if scorer == "uniform":
        return np.zeros(len(raw))
    raise ValueError(f"unknown drift_scorer {scorer!r}")

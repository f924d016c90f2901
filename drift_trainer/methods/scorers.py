"""Scorers: DRIFT, its ablations and the baselines it is compared with, all on the same refresh pipeline.

``drift_scorer`` names one registered :class:`Scorer`. A refresh always samples rollouts (their accuracy is logged for
every scorer) and always runs the train feature pass (features, gradient norms and losses); a scorer decides

1. the signs of the rollouts (:meth:`Scorer.signs`),
2. the target direction ``G`` in the projected gradient space (:meth:`Scorer.target`),
3. how raw inner products, norms and losses become scores (:meth:`Scorer.scores`),

and whether a ``fisher`` preconditioner applies to its target (:attr:`Scorer.uses_preconditioner`).

=================  ==========================================================  =====================================
scorer             target ``G``                                                score of train example ``i``
=================  ==========================================================  =====================================
``drift``          signed sum of normalised rollout features                   ``drift_debias`` of ``<H^-1 G, phi_i>``
``drift_unsigned`` correct rollouts only, each +1/#correct                     as ``drift``
``drift_raw``      as ``drift``                                                ``<H^-1 G, phi_i>`` (debias ``none``)
``drift_anchored`` per query: reference answer minus mean wrong rollout        as ``drift``
``off_policy``     mean normalised feature of the reference answers            ``<H^-1 G, phi_i>`` (raw: classic IF)
``cosine``         mean normalised feature of the reference answers            ``<G, phi_i / ||phi_i||>`` (mean cos)
``loss``           none                                                        ``-loss_i``
``random``         none                                                        seeded standard normal
``uniform``        none                                                        0, and weights stay exactly 1
=================  ==========================================================  =====================================

``off_policy`` is the classic influence baseline the paper argues against on both counts: off-policy targets and no
debiasing (with ``drift_debias='normalize'`` and the identity preconditioner it would equal ``cosine``). Its
on-policy counterpart is ``drift_raw``, so ``drift_raw`` vs ``off_policy`` isolates on-policy targets, and ``drift``
vs ``drift_raw`` isolates debiasing. ``uniform`` runs the whole refresh and keeps every weight at 1: the cost of a
refresh without its effect (``drift_method`` picks the method itself, see :mod:`drift_trainer.methods`).

Reference answers come from the query dataset's ``answer`` column: the completion ``answer`` + EOS after the
query's prompt, tokenized exactly as a rollout (so a correct rollout and its reference answer have the same feature).

A new scorer is a :class:`Scorer` subclass passed to :func:`register`; ``--drift_scorer`` then accepts its name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from drift_trainer.core.features import IGNORE_INDEX
from drift_trainer.core.influence import debias_raw, signed_target
from drift_trainer.core.params import InfluenceParams
from drift_trainer.core.rollouts import tokenize_prompt
from drift_trainer.core.weighting import normal_scores, standardize

REFERENCE_COLUMN = "answer"


@dataclass(frozen=True)
class TargetInputs:
    """What a scorer may build its target from: the refresh's rollouts and their signs, or the queries' references."""

    feature_pass: object  # FeaturePass: features of tokenized rows
    model: object
    tokenizer: object
    query_dataset: object
    query_rows: list[int]
    rollouts: object  # Rollouts
    signs: np.ndarray
    contrast: bool
    dim: int


class Scorer:
    """One way of scoring train examples at a refresh. Subclasses set :attr:`name` and :attr:`help` and override
    the steps they change; the defaults are a scorer with no target whose scores are 0."""

    name = ""
    help = ""
    uses_preconditioner = False  # a `fisher` preconditioner applies to this scorer's target
    reweights = True  # False: weights stay exactly 1 (the refresh runs for its metrics and cost only)

    def check_queries(self, query_dataset) -> None:
        """Raise before training when the query dataset lacks what this scorer needs."""

    def signs(self, rewards: np.ndarray, signs: np.ndarray, contrast: bool, threshold: float):
        """Rollout signs and whether the refresh may change the weights (signs: the signing rule's)."""
        return np.zeros_like(np.asarray(rewards, dtype=np.float64)), True

    def target(self, inputs: TargetInputs) -> np.ndarray:
        return np.zeros(inputs.dim)

    def target_halves(self, inputs: TargetInputs) -> np.ndarray | None:
        """``(2, dim)``: the targets of two disjoint halves of the evidence (summing to :meth:`target`), for the
        split-half reliability of ``drift_reliability_shrink``; None when the scorer has no such split."""
        return None

    def scores(self, raw, norms, losses, seed: int, params: InfluenceParams) -> np.ndarray:
        return np.zeros(len(raw))


SCORERS: dict[str, Scorer] = {}


def register(scorer: Scorer) -> Scorer:
    """Add ``scorer`` to the registry (``drift_scorer`` choices and help are read from it); returns it."""
    if not scorer.name:
        raise ValueError(f"{type(scorer).__name__} has no name.")
    SCORERS[scorer.name] = scorer
    return scorer


def get_scorer(name) -> Scorer:
    """The registered scorer ``name`` (a :class:`Scorer` is returned as is)."""
    if isinstance(name, Scorer):
        return name
    if name not in SCORERS:
        raise ValueError(f"drift_scorer must be one of {', '.join(map(repr, SCORERS))}; got {name!r}.")
    return SCORERS[name]


def scorer_help() -> str:
    return " ".join(f"`{s.name}`: {s.help}" for s in SCORERS.values())


def signed_halves(features: np.ndarray, signs: np.ndarray, half: np.ndarray, dim: int) -> np.ndarray:
    """``(2, dim)``: the signed targets (:func:`signed_target`) of the rows with ``half`` 0 and with ``half`` 1."""
    halves = np.zeros((2, dim))
    for h in (0, 1):
        if (half == h).any():
            halves[h] = signed_target(features[half == h], signs[half == h])
    return halves


class RolloutScorer(Scorer):
    """Targets built from the refresh's signed rollouts (DRIFT and its ablations)."""

    uses_preconditioner = True
    debias: str | None = None  # None: drift_debias / drift_norm_exponent; else this rule (exponent 1)

    def signs(self, rewards, signs, contrast, threshold):
        return signs, contrast

    def target(self, inputs: TargetInputs) -> np.ndarray:
        return self.target_halves(inputs).sum(0)

    def target_halves(self, inputs: TargetInputs) -> np.ndarray:
        """The signed targets of the rollouts of the even- and the odd-numbered sampled queries."""
        halves = np.zeros((2, inputs.dim))
        live = np.flatnonzero(inputs.signs != 0)
        if not (inputs.contrast and len(live)):
            return halves
        rows = inputs.rollouts.training_rows()
        rfeat, _, _ = inputs.feature_pass.run(inputs.model, [rows[j] for j in live])
        position = {int(q): i for i, q in enumerate(inputs.query_rows)}
        half = np.asarray([position.get(int(inputs.rollouts.query_index[j]), j) % 2 for j in live])
        return signed_halves(rfeat, inputs.signs[live], half, inputs.dim)

    def influence(self, raw, norms, params) -> np.ndarray:
        """Debiased influence scores (no loss mix)."""
        if self.debias is None:
            return debias_raw(raw, norms, params.debias, params.norm_exponent)
        return debias_raw(raw, norms, self.debias)

    def scores(self, raw, norms, losses, seed, params):
        scores = self.influence(raw, norms, params)
        mix = float(params.loss_mix)
        if mix <= 0:
            return scores
        live = np.asarray(norms) > 0
        neg_loss = -np.nan_to_num(np.asarray(losses, dtype=np.float64), nan=0.0)
        scale = normal_scores if params.loss_ranks else standardize
        z_influence, z_loss = scale(scores, live), scale(neg_loss, live)
        if params.loss_gate:  # loss counts as far as the influence corroborates it
            mix *= loss_agreement(z_influence[live], z_loss[live])
        return np.where(live, z_influence + mix * z_loss, 0.0)


def loss_agreement(z_influence: np.ndarray, z_neg_loss: np.ndarray) -> float:
    """``drift_loss_gate``: the positive part of the correlation between influence and low loss over the scored
    rows. High-loss rows that the rollouts also find harmful (label noise) count; high-loss rows the rollouts find
    helpful (hard but right, e.g. under a weak start model) do not."""
    if len(z_influence) < 3 or z_influence.std() == 0 or z_neg_loss.std() == 0:
        return 0.0
    return max(0.0, float(np.corrcoef(z_influence, z_neg_loss)[0, 1]))


class DriftScorer(RolloutScorer):
    name = "drift"
    help = "signed on-policy influence, debiased by `drift_debias` (the method)."


class DriftRawScorer(RolloutScorer):
    name = "drift_raw"
    help = "ablation: `drift` with drift_debias='none'."
    debias = "none"


class DriftUnsignedScorer(RolloutScorer):
    name = "drift_unsigned"
    help = "ablation: correct rollouts only, sign +1/#correct."

    def signs(self, rewards, signs, contrast, threshold):
        correct = np.asarray(rewards, dtype=np.float64) >= threshold
        return np.where(correct, 1.0 / max(int(correct.sum()), 1), 0.0), bool(correct.any())


class DriftAnchoredScorer(RolloutScorer):
    name = "drift_anchored"
    help = (
        "`drift` with each query's contrast anchored at its reference answer: the reference's feature minus the mean "
        "of the query's wrong rollouts', so a query whose rollouts are all wrong still counts (needs the queries' "
        "`answer` column)."
    )

    def check_queries(self, query_dataset) -> None:
        ReferenceScorer.check_queries(self, query_dataset)

    def signs(self, rewards, signs, contrast, threshold):
        wrong = np.asarray(rewards, dtype=np.float64) < threshold
        return np.where(wrong, -1.0, 0.0), bool(wrong.any())

    def target_halves(self, inputs: TargetInputs) -> np.ndarray:
        """Per query with a wrong rollout: its reference answer's unit feature minus the mean unit feature of its
        wrong rollouts, averaged over those queries; halves as for ``drift`` (even- and odd-numbered queries)."""
        self.check_queries(inputs.query_dataset)
        wrong = np.flatnonzero(np.asarray(inputs.signs) < 0)
        if not len(wrong):
            return np.zeros((2, inputs.dim))
        query = np.asarray(inputs.rollouts.query_index)[wrong]
        queries = sorted(set(query.tolist()))
        rows = inputs.rollouts.training_rows()
        refs = reference_rows(inputs.tokenizer, inputs.query_dataset, queries)
        feats, _, _ = inputs.feature_pass.run(inputs.model, [rows[j] for j in wrong] + refs)
        # one signed sum per half: +1/Q for each reference, -1/(Q * its query's wrong count) for each wrong rollout
        count = {q: int((query == q).sum()) for q in queries}
        weight = np.concatenate([[-1.0 / count[q] for q in query.tolist()], np.ones(len(queries))]) / len(queries)
        position = {int(q): i for i, q in enumerate(inputs.query_rows)}
        half = np.asarray([position.get(q, q) % 2 for q in query.tolist() + queries])
        return signed_halves(feats, weight, half, inputs.dim)


def has_reference(query_dataset) -> bool:
    """Whether the query dataset has the reference-answer column."""
    return REFERENCE_COLUMN in (getattr(query_dataset, "column_names", None) or [])


def require_reference(query_dataset, who: str, fix: str) -> None:
    """Raise unless the query dataset has the reference-answer column; ``who`` and ``fix`` name the option and the
    way out in the message."""
    if not has_reference(query_dataset):
        columns = getattr(query_dataset, "column_names", None) or []
        raise ValueError(
            f"{who} the queries' reference answers, but the query_dataset has no `{REFERENCE_COLUMN}` column "
            f"(columns: {columns or None}). Add one, {fix}."
        )


class ReferenceScorer(Scorer):
    """Targets built from the queries' reference answers (off-policy baselines): rollouts are not used."""

    def check_queries(self, query_dataset) -> None:
        require_reference(query_dataset, f"drift_scorer={self.name!r} scores towards", "or use drift_scorer='drift'")

    def target(self, inputs: TargetInputs) -> np.ndarray:
        self.check_queries(inputs.query_dataset)
        rows = reference_rows(inputs.tokenizer, inputs.query_dataset, inputs.query_rows)
        if not rows:
            return np.zeros(inputs.dim)
        rfeat, _, _ = inputs.feature_pass.run(inputs.model, rows)
        return signed_target(rfeat, np.full(len(rows), 1.0 / len(rows)))


class OffPolicyScorer(ReferenceScorer):
    name = "off_policy"
    help = (
        "baseline: classic influence (raw inner products, no debiasing) towards the gradients of the queries' "
        "reference answers (the query dataset's `answer` column) instead of rollouts."
    )
    uses_preconditioner = True

    def scores(self, raw, norms, losses, seed, params):
        return debias_raw(raw, norms, "none")


class CosineScorer(ReferenceScorer):
    name = "cosine"
    help = "baseline (LESS style): mean cosine similarity of train features to the reference-answer features."

    def scores(self, raw, norms, losses, seed, params):
        return debias_raw(raw, norms, "normalize", 1.0)


class LossScorer(Scorer):
    name = "loss"
    help = "baseline: low loss first, score = -loss."

    def scores(self, raw, norms, losses, seed, params):
        live = np.asarray(norms) > 0
        return np.where(live, -np.nan_to_num(np.asarray(losses, dtype=np.float64), nan=0.0), 0.0)


class RandomScorer(Scorer):
    name = "random"
    help = "baseline: seeded random scores."

    def scores(self, raw, norms, losses, seed, params):
        live = np.asarray(norms) > 0
        return np.where(live, np.random.default_rng(seed).standard_normal(len(raw)), 0.0)


class UniformScorer(Scorer):
    name = "uniform"
    help = "baseline: the refresh runs, weights stay exactly 1 (its cost without its effect)."
    reweights = False


for _cls in (
    DriftScorer,
    OffPolicyScorer,
    CosineScorer,
    LossScorer,
    RandomScorer,
    UniformScorer,
    DriftUnsignedScorer,
    DriftRawScorer,
    DriftAnchoredScorer,
):
    register(_cls())


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

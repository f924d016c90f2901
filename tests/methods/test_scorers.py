"""The `drift_scorer` option: each baseline / ablation builds the scores it documents (scorers.py)."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest

from drift_trainer.cli.toy import (
    addition_dataset,
    build_char_tokenizer,
    build_tiny_llama,
    offline_env,
    query_dataset_from,
)
from drift_trainer.core.features import IGNORE_INDEX, ProjectedGradients, select_target_modules
from drift_trainer.core.params import InfluenceParams
from drift_trainer.core.refresh import RefreshResult, new_weights
from drift_trainer.core.rewards import exact_match
from drift_trainer.core.rollouts import Rollouts
from drift_trainer.hf.config import SCORERS, DriftArguments
from drift_trainer.methods.scorers import get_scorer, reference_rows
from tests.helpers import refresh_once, sft_rows, train_view


def scorer_signs(args, rewards, signs, contrast):
    """The configured scorer's rollout signs (the registered object's ``signs``)."""
    return get_scorer(args.drift_scorer).signs(rewards, signs, contrast, args.drift_reward_threshold)


def scorer_scores(args, raw, norms, losses, seed):
    return get_scorer(args.drift_scorer).scores(raw, norms, losses, seed, InfluenceParams.of(args))


def check_scorer_inputs(args, queries):
    get_scorer(args.drift_scorer).check_queries(queries)


offline_env()


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def args_for(scorer, **kw):
    base = dict(
        drift_scorer=scorer,
        drift_num_queries=4,
        drift_num_rollouts=2,
        drift_max_new_tokens=4,
        drift_progress=False,
        drift_score_ema=0.0,
    )
    a = DriftArguments(**{**base, **kw})
    a.validate_drift()
    return a


def test_config_accepts_every_scorer_and_rejects_others():
    for s in SCORERS:
        args_for(s)
    assert DriftArguments().drift_scorer == "drift"
    with pytest.raises(ValueError, match="drift_scorer"):
        args_for("influence")


def test_unsigned_signs_only_correct_rollouts():
    rewards = np.array([1.0, 0.0, 1.0, 0.0, 0.0])
    drift_signs = np.array([0.5, -1 / 3, 0.5, -1 / 3, -1 / 3])
    s, contrast = scorer_signs(args_for("drift_unsigned"), rewards, drift_signs, True)
    np.testing.assert_allclose(s, [0.5, 0, 0.5, 0, 0])
    assert contrast
    s, contrast = scorer_signs(args_for("drift_unsigned"), np.zeros(3), np.zeros(3), False)
    assert not contrast and not s.any()
    # drift and drift_raw keep the signing rule's signs; reference / rollout-free scorers ignore rollouts
    for name in ("drift", "drift_raw"):
        s, c = scorer_signs(args_for(name), rewards, drift_signs, True)
        np.testing.assert_allclose(s, drift_signs)
    for name in ("off_policy", "cosine", "loss", "random", "uniform"):
        s, c = scorer_signs(args_for(name), rewards, drift_signs, False)
        assert c and not s.any()


def test_scores_per_scorer():
    # influence alone (drift_loss_mix=0): the debiasing rules; the default loss hybrid is tested below
    raw = np.array([4.0, -2.0, 1.0, 0.0])
    norms = np.array([4.0, 1.0, 0.5, 0.0])  # last row fully masked
    losses = np.array([0.1, 2.0, 0.5, np.nan])
    np.testing.assert_allclose(
        scorer_scores(args_for("drift", drift_loss_mix=0.0), raw, norms, losses, 0), [1.0, -2.0, 2.0, 0.0]
    )
    np.testing.assert_allclose(
        scorer_scores(args_for("drift_raw", drift_loss_mix=0.0), raw, norms, losses, 0), [4.0, -2.0, 1.0, 0.0]
    )
    np.testing.assert_allclose(
        scorer_scores(args_for("drift", drift_debias="none", drift_loss_mix=0.0), raw, norms, losses, 0),
        [4.0, -2.0, 1.0, 0.0],
    )
    # cosine always normalises (LESS), whatever drift_debias says
    np.testing.assert_allclose(
        scorer_scores(args_for("cosine", drift_debias="none"), raw, norms, losses, 0), [1.0, -2.0, 2.0, 0.0]
    )
    np.testing.assert_allclose(scorer_scores(args_for("loss"), raw, norms, losses, 0), [-0.1, -2.0, -0.5, 0.0])
    r1 = scorer_scores(args_for("random"), raw, norms, losses, 1)
    assert np.array_equal(r1, scorer_scores(args_for("random"), raw, norms, losses, 1))
    assert not np.array_equal(r1, scorer_scores(args_for("random"), raw, norms, losses, 2))
    assert r1[3] == 0.0 and np.all(r1[:3] != 0)
    assert not scorer_scores(args_for("uniform"), raw, norms, losses, 0).any()


def test_loss_mix_adds_standardised_low_loss_to_influence():
    raw = np.array([4.0, -2.0, 1.0, 3.0, 0.0])
    norms = np.array([4.0, 1.0, 0.5, 1.0, 0.0])  # last row fully masked
    losses = np.array([0.1, 2.0, 0.5, 3.0, np.nan])
    live = norms > 0

    def z(x):
        x = np.asarray(x, dtype=np.float64)
        return (x - x.mean()) / x.std()

    influence = raw[live] / norms[live]
    mixed = scorer_scores(args_for("drift", drift_loss_mix=0.5), raw, norms, losses, 0)
    np.testing.assert_allclose(mixed[live], z(influence) + 0.5 * z(-losses[live]))
    assert mixed[4] == 0.0
    # the high-loss row 3 ranks first by influence alone, and loses that place once loss counts
    assert np.argmax(influence) == 3 and np.argmax(mixed[live]) != 3
    np.testing.assert_allclose(
        scorer_scores(args_for("drift", drift_loss_mix=0.0), raw, norms, losses, 0)[live], influence
    )


def test_loss_ranks_mix_normal_scores_so_a_long_loss_tail_alone_cannot_sink_a_row():
    rng = np.random.default_rng(0)
    n = 400
    raw = rng.normal(size=n)
    norms = np.ones(n)
    losses = rng.exponential(0.1, size=n)
    losses[0], raw[0] = 50.0, 1.5  # one very hard row the influence finds helpful
    z_scores = scorer_scores(args_for("drift", drift_loss_mix=1.0), raw, norms, losses, 0)
    ranked = scorer_scores(args_for("drift", drift_loss_mix=1.0, drift_loss_ranks=True), raw, norms, losses, 0)
    assert np.argmin(z_scores) == 0  # z-scores: the loss tail puts it last
    assert (ranked < ranked[0]).mean() > 0.05  # normal scores: the loss counts as a rank, at most about -3
    influence_rank = np.argsort(np.argsort(raw)) + 0.5
    loss_rank = np.argsort(np.argsort(-losses)) + 0.5
    q = np.vectorize(NormalDist().inv_cdf)
    np.testing.assert_allclose(ranked, q(influence_rank / n) + q(loss_rank / n), atol=1e-9)


def test_uniform_keeps_weights_at_one_and_prune_would_not():
    scores = np.zeros(10)
    result = RefreshResult(
        step=1,
        scores=scores,
        raw_scores=scores,
        grad_norm=np.ones(10),
        loss=np.ones(10),
        scored=np.ones(10, bool),
        rollouts=Rollouts(),
        signs=np.zeros(0),
        contrast=True,
    )
    _, w = new_weights(result, None, None, args_for("uniform", drift_weighting="prune"))
    np.testing.assert_array_equal(w, np.ones(10))
    _, w = new_weights(result, None, None, args_for("random", drift_weighting="prune"))
    assert (w < 1).any()  # equal scores through `prune` still drop rows: uniform must bypass the weighting


def test_reference_rows_match_a_correct_rollout(tok):
    queries = query_dataset_from(addition_dataset(3, seed=4))
    rows = reference_rows(tok, queries, [0, 2])
    assert len(rows) == 2
    for row, qi in zip(rows, [0, 2]):
        prompt = tok(queries[qi]["prompt"])["input_ids"]
        answer = tok(queries[qi]["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert row["input_ids"] == prompt + answer
        assert row["labels"] == [IGNORE_INDEX] * len(prompt) + answer


def test_reference_scorers_need_an_answer_column():
    queries = query_dataset_from(addition_dataset(3, seed=4)).remove_columns("answer")
    for name in ("off_policy", "cosine"):
        with pytest.raises(ValueError, match="answer"):
            check_scorer_inputs(args_for(name), queries)
    check_scorer_inputs(args_for("drift"), queries)


@pytest.fixture(scope="module")
def setup(tok):
    model = build_tiny_llama(tok, hidden_size=32, num_layers=1, seed=0)
    train = addition_dataset(24, seed=5)
    query = query_dataset_from(addition_dataset(1, seed=6))
    # the query's own reference answer is one of the train rows (row 0)
    train = train.select(range(1, 24))
    from datasets import concatenate_datasets

    copy = query.map(lambda r: {"completion": r["answer"], "corrupted": False})
    train = concatenate_datasets([copy.select_columns(train.column_names), train])
    view = train_view(sft_rows(tok, train))
    projector = ProjectedGradients(select_target_modules(model), 8, seed=0)
    return model, view, query, projector


def _refresh(tok, setup, args, reward=exact_match):
    """One refresh of the setup's model, rows and query, judged by ``reward``."""
    model, view, query, projector = setup
    return refresh_once(args, model, tok, view, query, [reward], projector)


@pytest.mark.parametrize("scorer", SCORERS)
def test_run_refresh_each_scorer(tok, setup, scorer):
    _, view, _, _ = setup
    args = args_for(scorer)
    result = _refresh(tok, setup, args)
    assert result.scores.shape == (len(view),) and np.isfinite(result.scores).all()
    assert len(result.rollouts) == 2  # every scorer still samples (and logs) rollouts
    _, weights = new_weights(result, None, None, args)
    assert np.isclose(weights.mean(), 1.0)
    if scorer == "loss":
        np.testing.assert_allclose(result.scores, -result.loss)
    if scorer == "uniform":
        np.testing.assert_array_equal(weights, np.ones(len(view)))
    if scorer == "random":
        assert np.std(result.scores) > 0.5
    if scorer == "cosine":
        # one query: the train row that *is* its reference answer has cosine 1, the maximum
        assert result.contrast
        assert np.argmax(result.scores) == 0
        assert result.scores[0] == pytest.approx(1.0, abs=1e-6)
        assert np.all(result.scores <= 1.0 + 1e-9)
    if scorer == "drift_anchored":  # an untrained model is wrong everywhere, and the reference still anchors
        assert result.contrast and result.scores.any()
    if scorer in ("drift", "drift_raw", "drift_unsigned") and not result.contrast:
        assert not result.scores.any()  # an untrained model: no correct rollout, so no target


def test_off_policy_is_not_cosine_without_normalisation(tok, setup):
    off = _refresh(tok, setup, args_for("off_policy"))  # default drift_debias='normalize' does not apply
    cos = _refresh(tok, setup, args_for("cosine"))
    assert not np.allclose(off.scores, cos.scores)
    # one query: raw influence = cosine to the reference feature x the train feature's norm x the target's norm (1)
    np.testing.assert_allclose(off.scores, cos.scores * off.grad_norm, rtol=1e-6, atol=1e-9)
    assert off.scores[0] == pytest.approx(off.grad_norm[0], rel=1e-6)


def _parity_reward(prompts, completions, **kw):
    """An arbitrary judge that marks some rollouts of an untrained model correct, so signing has contrast."""
    return [float(len(c) % 2 == 0) for c in completions]


def test_drift_ablations_share_rollouts_and_differ_as_documented(tok, setup):
    many = dict(drift_num_rollouts=8, drift_max_new_tokens=6, drift_loss_mix=0.0)  # influence alone
    drift = _refresh(tok, setup, args_for("drift", **many), _parity_reward)
    raw = _refresh(tok, setup, args_for("drift_raw", **many), _parity_reward)
    unsigned = _refresh(tok, setup, args_for("drift_unsigned", **many), _parity_reward)
    assert drift.contrast and raw.contrast and unsigned.contrast, "the parity judge should give mixed verdicts"
    assert [c for c in drift.rollouts.completions] == [c for c in raw.rollouts.completions]  # same seeded rollouts
    np.testing.assert_allclose(raw.raw_scores, drift.raw_scores)
    np.testing.assert_allclose(raw.scores, drift.raw_scores)  # drift_raw: no debiasing
    np.testing.assert_allclose(drift.scores, drift.raw_scores / drift.grad_norm)  # drift: normalize (alpha 1)
    assert (unsigned.signs >= 0).all() and (drift.signs < 0).any()
    assert not np.allclose(unsigned.scores, drift.scores)


def test_loss_gate_counts_loss_only_as_far_as_influence_agrees():
    from drift_trainer.methods.scorers import loss_agreement

    rng = np.random.default_rng(0)
    n = 200
    norms = np.ones(n)
    losses = rng.gamma(2.0, 1.0, size=n)
    gated = args_for("drift", drift_loss_mix=1.0, drift_loss_gate=True)
    ungated = args_for("drift", drift_loss_mix=1.0)
    # influence that disagrees with low loss (hard rows help): the gate shuts the loss term off entirely
    helpful_hard = losses + 0.1 * rng.normal(size=n)
    s = scorer_scores(gated, helpful_hard, norms, losses, 0)
    z = (helpful_hard - helpful_hard.mean()) / helpful_hard.std()
    np.testing.assert_allclose(s, z)
    assert not np.allclose(scorer_scores(ungated, helpful_hard, norms, losses, 0), z)
    # influence that agrees (noisy rows: high loss and harmful): the loss term counts by the correlation
    harmful_noisy = -losses + rng.normal(size=n)
    r = loss_agreement(*(((x - x.mean()) / x.std()) for x in (harmful_noisy, -losses)))
    assert 0.5 < r < 1.0
    zi = (harmful_noisy - harmful_noisy.mean()) / harmful_noisy.std()
    zl = (-losses + losses.mean()) / losses.std()
    np.testing.assert_allclose(scorer_scores(gated, harmful_noisy, norms, losses, 0), zi + r * zl)


class _LookupFeatures:
    """A feature pass whose feature of a row is a fixed vector chosen by the row's last label token."""

    def __init__(self, table):
        self.table = table

    def run(self, model, rows):
        return np.stack([self.table[r["labels"][-2]] for r in rows]), None, None


def test_anchored_target_is_reference_minus_mean_wrong_rollout_per_query(tok):
    from datasets import Dataset

    from drift_trainer.methods.scorers import TargetInputs

    queries = Dataset.from_dict({"prompt": ["1+1=", "2+2=", "3+3="], "answer": ["2", "4", "6"]})
    ids = {ch: tok.convert_tokens_to_ids(ch) for ch in "24567"}
    p = tok("1+1=", add_special_tokens=False)["input_ids"]
    eos = tok.eos_token_id
    # query 0: rollouts "2" (right) and "5" (wrong); query 1: "5", "7" (both wrong); query 2: "6" (right only)
    rollouts = Rollouts(
        query_index=[0, 0, 1, 1, 2],
        prompt_ids=[p] * 5,
        completion_ids=[[ids[c], eos] for c in "25576"],
        rewards=[1.0, 0.0, 0.0, 0.0, 1.0],
    )
    rng = np.random.default_rng(0)
    table = {ids[c]: rng.normal(size=4) for c in "24567"}
    unit = {c: table[ids[c]] / np.linalg.norm(table[ids[c]]) for c in "24567"}
    scorer = get_scorer("drift_anchored")
    signs, contrast = scorer.signs(np.asarray(rollouts.rewards), np.zeros(5), False, 0.5)
    assert contrast  # query 1 has no right rollout, yet it counts: its reference is the anchor
    inputs = TargetInputs(_LookupFeatures(table), None, tok, queries, [0, 1, 2], rollouts, signs, contrast, 4)
    halves = scorer.target_halves(inputs)
    np.testing.assert_allclose(halves[0], (unit["2"] - unit["5"]) / 2)  # query 0 (even); query 2 has nothing wrong
    np.testing.assert_allclose(halves[1], (unit["4"] - (unit["5"] + unit["7"]) / 2) / 2)
    np.testing.assert_allclose(scorer.target(inputs), halves.sum(0))
    # nothing wrong anywhere: no contrast, and a zero target
    signs, contrast = scorer.signs(np.ones(5), np.zeros(5), False, 0.5)
    assert (
        not contrast and not scorer.target(TargetInputs(None, None, tok, queries, [0], rollouts, signs, False, 4)).any()
    )
    with pytest.raises(ValueError, match="answer"):
        scorer.check_queries(queries.remove_columns("answer"))

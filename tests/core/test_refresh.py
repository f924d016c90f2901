"""run_refresh on its own, outside any Trainer, and the speed and memory options of a refresh: block rescoring
(`drift_max_train_examples`) and feature spilling to a memory-mapped file (`drift_feature_memmap_dir`,
`drift_feature_memory_mb`). No timed assertions: speed targets live in benchmarks/overhead.py."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from drift_trainer.cli.toy import (
    addition_dataset,
    build_char_tokenizer,
    build_tiny_llama,
    offline_env,
    query_dataset_from,
)
from drift_trainer.core.feature_pass import FeaturePass, refresh_subset
from drift_trainer.core.features import ProjectedGradients, select_target_modules
from drift_trainer.core.refresh import RefreshResult, new_weights
from drift_trainer.core.rollouts import Rollouts
from drift_trainer.core.storage import feature_storage, row_chunks as _row_chunks
from drift_trainer.hf.config import DriftArguments
from tests.helpers import digit_start_reward, drift_args, refresh_once, sft_rows, train_view

offline_env()


def test_refresh_without_a_pad_token_and_with_a_bare_reward_callable(tokenizer, tiny_model):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    rows = sft_rows(tokenizer, addition_dataset(10, seed=4))
    args = DriftArguments(drift_num_queries=4, drift_max_new_tokens=4, drift_progress=False)
    result = refresh_once(
        args,
        tiny_model,
        no_pad,
        train_view(rows),
        query_dataset_from(addition_dataset(4, seed=1)),
        digit_start_reward,  # a bare callable, not a list
        ProjectedGradients(select_target_modules(tiny_model), 4),
    )
    assert result.contrast
    assert result.scored.all() and np.count_nonzero(result.scores) == 10
    assert len(result.rollouts) == 16


# ---------------------------------------------------------------- speed and memory options


@pytest.fixture(scope="module")
def toy():
    tok = build_char_tokenizer()
    model = build_tiny_llama(tok, hidden_size=32, num_layers=1, num_heads=2)
    queries = addition_dataset(6, seed=1).select_columns(["prompt", "answer"])
    return tok, model, sft_rows(tok, addition_dataset(40, seed=0)), queries


def alternating_reward(prompts, completions, **kwargs):
    """Half right, half wrong, whatever the model says: every refresh has contrast."""
    return [float(i % 2) for i in range(len(prompts))]


def _args(**kw):
    base = {
        "drift_num_queries": 4,
        "drift_num_rollouts": 2,
        "drift_max_new_tokens": 3,
        "drift_feature_batch_size": 8,
        "drift_projection_dim": 4,
        "drift_progress": False,
    }
    return drift_args(**{**base, **kw})


def _refresh(toy, args, refresh_index=0, reward=None, **kwargs):
    tok, model, rows, queries = toy
    projector = ProjectedGradients(select_target_modules(model), args.drift_projection_dim, seed=0)
    torch.manual_seed(0)
    return refresh_once(
        args,
        model,
        tok,
        train_view(rows),
        queries,
        [reward or alternating_reward],
        projector,
        refresh_index=refresh_index,
        seed=0,
        **kwargs,
    )


# ---------------------------------------------------------------- block rescoring


def test_refresh_subset_cycles_through_every_row_in_equal_blocks():
    assert np.array_equal(refresh_subset(10, None, 3, 0), np.arange(10))
    assert np.array_equal(refresh_subset(10, 10, 3, 0), np.arange(10))
    blocks = [refresh_subset(103, 25, r, seed=7) for r in range(5)]  # 5 blocks of 20-21 rows
    assert all(20 <= len(b) <= 25 for b in blocks)
    assert np.array_equal(np.sort(np.concatenate(blocks)), np.arange(103))  # a partition: each row once per cycle
    assert np.array_equal(refresh_subset(103, 25, 5, seed=7), blocks[0])  # the cycle repeats
    assert np.array_equal(refresh_subset(103, 25, 2, seed=7), blocks[2])  # deterministic (identical on all ranks)
    assert not np.array_equal(refresh_subset(103, 25, 0, seed=8), blocks[0])


def test_block_refresh_scores_only_its_block_and_matches_full_scores(toy):
    full = _refresh(toy, _args(drift_debias="none"), refresh_index=1)  # same queries and rollouts
    part = _refresh(toy, _args(drift_debias="none", drift_max_train_examples=15), refresh_index=1)
    assert full.contrast and part.contrast
    block = refresh_subset(40, 15, 1, 0)
    assert part.scored.sum() == len(block) == 13  # 40 rows in 3 blocks of 13-14
    assert np.array_equal(np.flatnonzero(part.scored), block)
    # same model, same rollouts: the block's raw scores and norms are the full refresh's
    np.testing.assert_allclose(part.raw_scores[block], full.raw_scores[block], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(part.grad_norm[block], full.grad_norm[block], rtol=1e-5)
    assert np.all(part.raw_scores[~part.scored] == 0) and np.all(np.isnan(part.loss[~part.scored]))


def _result(scores, scored):
    return RefreshResult(
        step=1,
        scores=np.asarray(scores, float),
        raw_scores=np.asarray(scores, float),
        grad_norm=np.ones(len(scores)),
        loss=np.zeros(len(scores)),
        scored=np.asarray(scored, bool),
        rollouts=Rollouts.__new__(Rollouts),
        signs=np.zeros(0),
        contrast=True,
    )


def test_new_weights_block_mode_keeps_previous_scores_outside_the_block():
    args = _args(drift_max_train_examples=3, drift_score_ema=0.5)
    prev_smoothed = np.array([1.0, -1.0, 0.5, -0.5, 0.0, 0.0])  # rows 4, 5 never scored yet
    prev_weights = np.array([2.0, 0.5, 1.5, 0.7, 1.0, 1.0])
    res = _result([3.0, 1.0, 0.0, 0.0, 2.0, 0.0], [True, True, False, False, True, False])
    z, w = new_weights(res, prev_smoothed, prev_weights, args)
    fresh = np.array([3.0, 1.0, 2.0])
    fresh = (fresh - fresh.mean()) / fresh.std()
    np.testing.assert_allclose(z[[0, 1, 4]], 0.5 * prev_smoothed[[0, 1, 4]] + 0.5 * fresh)
    np.testing.assert_allclose(z[[2, 3]], prev_smoothed[[2, 3]])  # stale block: previous smoothed score kept
    assert z[5] == 0.0 and w[5] == prev_weights[5]  # never scored: weight untouched
    known = np.array([True, True, True, True, True, False])
    np.testing.assert_allclose(w[known].mean(), 1.0)  # weights are re-derived over every example with a score
    assert np.argmax(w) == np.argmax(np.where(known, z, -np.inf))
    # default (no block rescoring) keeps the old rule: unscored rows keep their previous weight, smoothed 0
    z0, w0 = new_weights(res, prev_smoothed, prev_weights, _args(drift_score_ema=0.5))
    assert z0[2] == 0.0 and w0[2] == prev_weights[2]


def test_new_weights_reference_bound_demotes_only_rows_beyond_every_reference():
    res = _result([0.5, -0.5, 1.0, -1.0, 0.0, 2.0], [True] * 5 + [False])
    res.loss = np.array([0.2, 3.0, 0.9, 0.1, 1.5, np.nan])
    res.reference_loss = np.array([0.3, 1.0, 0.7])
    assert res.beyond_reference is None  # the option off
    res.reference_bound = True
    assert res.beyond_reference.tolist() == [False, True, False, False, True, False]  # unscored: never beyond
    _, w = new_weights(res, None, None, _args(drift_weighting="flat", drift_reference_bound=True))
    np.testing.assert_allclose(w[[1, 4]], 0.1)  # the uniform-mix floor
    np.testing.assert_allclose(w[[0, 2, 3]], 0.9 * 5 / 3 + 0.1)
    assert w[5] == 1.0
    _, off = new_weights(res, None, None, _args(drift_weighting="flat"))  # the flag off: nothing moves
    np.testing.assert_allclose(off, 1.0)
    res.reference_loss = None  # no reference losses (e.g. a refresh without contrast): the bound does nothing
    _, none = new_weights(res, None, None, _args(drift_weighting="flat", drift_reference_bound=True))
    np.testing.assert_allclose(none, 1.0)


def test_reference_losses_are_the_reference_answers_losses_under_the_model(toy):
    from drift_trainer.core.pipeline import stage_seed
    from drift_trainer.core.refresh import refresh_summary
    from drift_trainer.core.rollouts import sample_queries

    tok, model, rows, queries = toy
    by_hand = {}
    for qi in range(len(queries)):  # recomputed by hand: mean cross-entropy of answer + EOS after the prompt
        prompt = tok(queries[qi]["prompt"])["input_ids"]
        answer = tok(queries[qi]["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([prompt + answer])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
        by_hand[qi] = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(answer)).item()
    # the gate on (the default): every query's reference, and every train row's loss by the same forward passes
    gated = _refresh(toy, _args())
    np.testing.assert_allclose(np.sort(gated.reference_loss), np.sort(list(by_hand.values())), rtol=1e-4)
    np.testing.assert_allclose(gated.harm_sample_loss, gated.loss, rtol=1e-4)  # = the feature pass's losses
    # the bound alone: the refresh's sampled queries only
    args = _args(drift_weighting="flat", drift_reference_bound=True, drift_harm_gate=False)
    res = _refresh(toy, args)
    assert res.harm_sample_loss is None
    picked = sample_queries(queries, args.drift_num_queries, stage_seed("queries", 0, 0))
    expected = [by_hand[int(qi)] for qi in picked]
    np.testing.assert_allclose(np.sort(res.reference_loss), np.sort(expected), rtol=1e-4)
    beyond = res.scored & (res.loss > max(expected))
    assert np.array_equal(res.beyond_reference, beyond)
    metrics = refresh_summary(res, np.ones(len(res.scores)))
    assert metrics["drift/beyond_reference"] == pytest.approx(beyond[res.scored].mean())
    assert metrics["drift/reference_loss_max"] == pytest.approx(max(expected), rel=1e-4)
    with pytest.raises(ValueError, match="drift_reference_bound"):
        _refresh((tok, model, rows, queries.remove_columns("answer")), args)


# ---------------------------------------------------------------- memory-mapped features


def test_feature_storage_spills_to_an_unlinked_memmap(tmp_path):
    mem = feature_storage(10, 4)
    assert type(mem) is np.ndarray and mem.dtype == np.float32 and not mem.any()
    mm = feature_storage(10, 4, memmap_dir=str(tmp_path / "feats"))
    assert isinstance(mm, np.memmap) and mm.shape == (10, 4) and mm.dtype == np.float32
    assert os.listdir(tmp_path / "feats") == []  # unlinked at once: nothing left behind
    mm[3] = 7.0
    assert mm[3].sum() == 28.0
    auto = feature_storage(1000, 1000, max_memory_mb=1.0)  # 4 MB > 1 MB: spills to the temp dir
    assert isinstance(auto, np.memmap)
    assert type(feature_storage(100, 100, max_memory_mb=1.0)) is np.ndarray  # 40 kB stays in memory


def test_row_chunks_cover_every_row():
    chunks = list(_row_chunks(10, 4, target_bytes=64))  # 64 B = 2 float64 rows of 4
    assert [(c.start, c.stop) for c in chunks] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    assert list(_row_chunks(0, 4)) == []


def test_feature_pass_memmap_equals_in_memory(toy, tmp_path):
    tok, model, rows, _ = toy
    projector = ProjectedGradients(select_target_modules(model), 4, seed=0)
    mem, loss_a, _ = FeaturePass(projector, tok.pad_token_id, 8).run(model, rows)
    mm, loss_b, _ = FeaturePass(projector, tok.pad_token_id, 8, memmap_dir=str(tmp_path)).run(model, rows)
    assert isinstance(mm, np.memmap) and not isinstance(mem, np.memmap)
    assert np.abs(mem).sum() > 0
    np.testing.assert_array_equal(np.asarray(mm), mem)
    np.testing.assert_array_equal(loss_a, loss_b)


def test_refresh_with_memmap_and_fisher_matches_in_memory(toy, tmp_path):
    a = _refresh(toy, _args(drift_preconditioner="fisher"))
    b = _refresh(toy, _args(drift_preconditioner="fisher", drift_feature_memmap_dir=str(tmp_path)))
    assert a.contrast and a.scored.all()
    np.testing.assert_allclose(b.scores, a.scores, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(b.grad_norm, a.grad_norm, rtol=1e-6)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- issue 13's options


def test_kronecker_preconditioner_in_a_refresh(toy):
    from drift_trainer.core.influence import kronecker_factors, kronecker_precondition

    plain = _refresh(toy, _args(drift_loss_mix=0.0))  # influence alone, so the scores are the formula below
    kron = _refresh(toy, _args(drift_preconditioner="kronecker", drift_loss_mix=0.0))
    assert kron.contrast and kron.scored.all()
    np.testing.assert_allclose(kron.target, plain.target)  # same rollouts, same G
    # the refresh's scores are the train features against the per-module Kronecker-preconditioned G
    tok, model, rows, _ = toy
    projector = ProjectedGradients(select_target_modules(model), 4, seed=0)
    phi, _, _ = FeaturePass(projector, tok.pad_token_id, 8).run(model, rows)
    phi = np.asarray(phi, dtype=np.float64)
    s, a, _ = kronecker_factors([phi], 4, projector.dim)
    expected = phi @ kronecker_precondition(kron.target, s, a, 0.1) / np.linalg.norm(phi, axis=1)
    np.testing.assert_allclose(kron.scores, expected, rtol=1e-4, atol=1e-9 * np.abs(expected).max())
    assert np.corrcoef(kron.scores, plain.scores)[0, 1] < 0.999  # it does precondition


def test_reliability_shrink_moves_the_weights_part_of_the_way_from_one(toy):
    base = _refresh(toy, _args())
    shrunk = _refresh(toy, _args(drift_reliability_shrink=True))
    assert base.reliability is None and 0.0 <= shrunk.reliability <= 1.0
    np.testing.assert_allclose(shrunk.scores, base.scores, rtol=1e-6)  # the scores themselves are unchanged
    args = _args(drift_reliability_shrink=True)
    z_base, w_base = new_weights(base, None, None, _args())
    assert np.ptp(w_base) > 0.1
    for r in (1.0, 0.5, 0.0):  # half the evidence agreeing moves every weight half way; none leaves them at 1
        shrunk.reliability = r
        z, w = new_weights(shrunk, None, None, args)
        np.testing.assert_allclose(z, z_base, atol=1e-12)
        np.testing.assert_allclose(w, 1.0 + r * (w_base - 1.0), atol=1e-12)
        assert abs(w.mean() - 1.0) < 1e-9
    # the same with the scores of a previous refresh smoothed in (the rules standardise their input, which must not
    # undo the shrink)
    shrunk.reliability = 0.5
    _, w_prev = new_weights(base, z_base[::-1].copy(), None, _args())
    _, w_half = new_weights(shrunk, z_base[::-1].copy(), None, args)
    np.testing.assert_allclose(w_half, 1.0 + 0.5 * (w_prev - 1.0), atol=1e-12)


def test_target_ema_smooths_the_unit_target_across_refreshes(toy):
    first = _refresh(toy, _args(drift_target_ema=0.5))
    np.testing.assert_allclose(np.linalg.norm(first.target), 1.0)
    fresh = _refresh(toy, _args(drift_target_ema=0.5), refresh_index=1)  # no previous target: its own unit target
    second = _refresh(toy, _args(drift_target_ema=0.5), refresh_index=1, previous_target=first.target)
    np.testing.assert_allclose(second.target, 0.5 * first.target + 0.5 * fresh.target, atol=1e-12)
    plain = _refresh(toy, _args())  # ema 0: the raw target, scores unchanged by the option
    assert np.linalg.norm(plain.target) != pytest.approx(1.0)


def first_query_mixed_reward(prompts, completions, **kwargs):
    """Mixed verdicts for one query only (the first prompt seen), all wrong for the others."""
    first = prompts[0]
    return [float(p == first and i % 2 == 0) for i, p in enumerate(prompts)]


def test_contrast_rollouts_go_to_queries_with_mixed_verdicts(toy):
    from drift_trainer.core.pipeline import mixed_queries

    base = _refresh(toy, _args(drift_num_rollouts=4))
    more = _refresh(toy, _args(drift_num_rollouts=4, drift_contrast_rollouts=3))
    assert len(base.rollouts) == 16  # 4 queries x 4 rollouts, every query mixed under the alternating reward
    assert len(more.rollouts) == 16 + 4 * 3
    assert more.rollouts.completion_ids[:16] == base.rollouts.completion_ids  # the first round is unchanged
    extra_queries = more.rollouts.query_index[16:]
    assert sorted(set(extra_queries)) == sorted(set(base.rollouts.query_index))
    # only the queries whose verdicts differ get more
    one = _refresh(toy, _args(drift_num_rollouts=4, drift_contrast_rollouts=3), reward=first_query_mixed_reward)
    first = one.rollouts.query_index[0]
    assert mixed_queries(one.rollouts, sorted(set(one.rollouts.query_index))) == [first]
    assert len(one.rollouts) == 16 + 3 and set(one.rollouts.query_index[16:]) == {first}


def _refresher(toy, args):
    from drift_trainer.core.refresher import Refresher

    tok, model, rows, queries = toy
    projector = ProjectedGradients(select_target_modules(model), args.drift_projection_dim, seed=0)
    return Refresher(
        args,
        view=train_view(rows),
        query_dataset=queries,
        reward_funcs=[alternating_reward],
        projector=projector,
        tokenizer=tok,
        progress=False,
    )


def test_harm_gate_keeps_weights_at_one_until_harm_then_stays_open(toy):
    tok, model, rows, queries = toy
    args = _args(drift_harm_gate=True, drift_harm_alpha=0.1)
    refresher = _refresher(toy, args)
    start = refresher.measure_start(model)
    assert len(start) == args.drift_num_queries and set(start.values()) == {0.5}
    assert refresher.state.start_loss_p >= 0.1 and refresher.state.harm_step is None  # no harm at the start
    out = refresher.refresh(model, 1)
    # the start model's own verdicts, no row far beyond the references: nothing to fix, plain SFT's weights
    assert out.metrics["drift/harm_found"] == 0.0 and refresher.state.harm_step is None
    assert np.all(out.weights == 1.0) and out.metrics["drift/harm_p_accuracy"] == 1.0
    assert out.summary["weights_changed"] is False  # the summary says the shut gate held them
    refresher.state.start_accuracy = {q: 1.0 for q in range(len(queries))}  # a start that solved every query
    out = refresher.refresh(model, 2)
    assert out.metrics["drift/harm_p_accuracy"] < 0.1 and refresher.state.harm_step == 2
    assert not np.all(out.weights == 1.0)  # the weighting rule's weights from now on
    assert out.summary["weights_changed"] is True
    refresher.state.start_accuracy = {q: 0.0 for q in range(len(queries))}  # the evidence gone: still open
    out = refresher.refresh(model, 3)
    assert refresher.state.harm_step == 2 and out.metrics["drift/harm_found"] == 1.0
    assert not np.all(out.weights == 1.0)


@pytest.mark.parametrize("max_rank", [1, 8])
def test_harm_found_on_the_start_model_opens_the_gate_from_the_first_refresh(toy, monkeypatch, max_rank):
    from drift_trainer.core import refresher as refresher_module
    from drift_trainer.core.harm import tail_count_p

    tok, model, rows, queries = toy
    args = _args(drift_harm_gate=True, drift_harm_max_rank=max_rank)
    hard_query = max_rank > 1  # that case adds one reference harder than every row: only j >= 2 sees the rows

    def start_losses(fp, model, tokenizer, view, query_dataset, seed, refresh_index, dist=None):
        assert refresh_index == -1  # the start model's sample, not a refresh's
        refs = np.r_[50.0, np.ones(63)] if hard_query else np.ones(64)
        return np.r_[np.full(10, 9.0), np.zeros(30)], refs  # a quarter of the rows above 63 of 64 references

    monkeypatch.setattr(refresher_module, "harm_losses", start_losses)
    refresher = _refresher(toy, args)
    refresher.measure_start(model)
    assert refresher.state.harm_step == 0
    if not hard_query:  # the rows above every reference: the product formula
        assert refresher.state.start_loss_p == pytest.approx(np.prod([(40 - i) / (40 + 64 - i) for i in range(10)]))
    else:  # none above the hard one; the 10 above the 2nd largest, Bonferroni over j = 1, 2, 4, 8
        assert refresher.state.start_loss_p == pytest.approx(4 * tail_count_p(40, 64, 2, 10))
    out = refresher.refresh(model, 1)
    assert out.metrics["drift/harm_found"] == 1.0 and not np.all(out.weights == 1.0)
    assert out.metrics["drift/harm_p_loss_start"] == refresher.state.start_loss_p

import numpy as np
import pytest
import torch
from datasets import Dataset

from drift_trainer.cli.toy import addition_dataset, query_dataset_from
from drift_trainer.core.rollouts import (
    _generate_call,
    _left_pad,
    _next_tokens,
    check_query_dataset,
    generate_rollouts,
    generation_config,
    length_batches,
    sample_call,
    sample_queries,
)
from drift_trainer.hf.config import DriftArguments
from tests.helpers import digit_start_reward


def _args(**kw):
    return DriftArguments(**{"drift_num_rollouts": 3, "drift_max_new_tokens": 5, "drift_rollout_batch_size": 4, **kw})


def test_rollouts_match_unbatched_generation_and_restore_state(tokenizer, tiny_model):
    queries = query_dataset_from(addition_dataset(5, seed=1))
    tiny_model.train()
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    out = generate_rollouts(tiny_model, tokenizer, queries, [0, 2, 4], _args(), [digit_start_reward], seed=7)
    assert torch.rand(1) == before, "sampling must not consume the training RNG stream"
    assert tiny_model.training, "train mode restored"
    assert len(out) == 9 and out.query_index == [0, 0, 0, 2, 2, 2, 4, 4, 4]
    assert all(isinstance(c, str) for c in out.completions)
    eos = tokenizer.eos_token_id
    for ids in out.completion_ids:
        assert 1 <= len(ids) <= 5 and (eos not in ids[:-1])
    # left padding must not change what is sampled: greedy decoding batched == one by one
    args = _args(drift_temperature=1e-4)
    batched = generate_rollouts(tiny_model, tokenizer, queries, [0, 1, 2, 3], args, [digit_start_reward], seed=1)
    for j, q in enumerate(batched.query_index[::3]):
        single = generate_rollouts(tiny_model, tokenizer, queries, [q], args, [digit_start_reward], seed=1)
        assert single.completion_ids[0] == batched.completion_ids[3 * j]
    np.testing.assert_array_equal(out.rewards, digit_start_reward(None, out.completions))


def test_rollout_calls_are_chosen_by_length():
    lengths = [5, 40, 6, 5, 41, 7, 5, 6]
    batches = length_batches(lengths, batch_size=4, max_new_tokens=8)
    assert sorted(i for b in batches for i in b) == list(range(8))  # every rollout once
    assert all(b == sorted(b) for b in batches)  # in their original order within a call
    budget = 4 * (np.mean(lengths) + 8)
    for b in batches:
        assert len(b) <= 4 and len(b) * (max(lengths[i] for i in b) + 8) <= budget or len(b) == 1
    # the short prompts share calls of 4, the two long ones get calls of their own size
    assert [sorted(lengths[i] for i in b) for b in batches] == [[5, 5, 5, 6], [6, 7], [40], [41]]
    # equal lengths: plain chunks of batch_size in order
    assert length_batches([3] * 6, 4, 2) == [[0, 1, 2, 3], [4, 5]]
    assert length_batches([], 4, 2) == []


def test_rollouts_decode_each_row_only_until_its_eos(tokenizer, tiny_model):
    queries = query_dataset_from(addition_dataset(4, seed=1))
    out = generate_rollouts(tiny_model, tokenizer, queries, [0, 1, 2, 3], _args(), [digit_start_reward], seed=3)
    assert len(out.decode_steps) == len(out)
    assert out.decode_steps == [len(ids) for ids in out.completion_ids]  # no row is decoded past its own end


def _early_eos(tokenizer, model, ids, mask, cfg):
    """A token that near-greedy decoding emits first on some rows but not on all: used as EOS, rows end apart."""
    first = model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, ids.shape[1] :]
    for t in first[:, 1].tolist():
        ends = [t in row for row in first.tolist()]
        if any(ends) and not all(ends):
            return t
    raise AssertionError("no token ends some rows but not others: pick other prompts for this test")


def test_rows_leave_the_batch_at_eos_and_sample_as_generate(tokenizer, tiny_model):
    tiny_model.eval()
    prompts = [tokenizer(text=t)["input_ids"] for t in ["1+2=", "13+25=", "7+8=", "40+41=", "3+3="]]
    ids, mask = _left_pad(prompts, tokenizer.pad_token_id, "cpu")
    cfg = generation_config(_args(drift_top_p=1e-6, drift_max_new_tokens=8), tokenizer)  # top-1 only: greedy
    cfg.eos_token_id = _early_eos(tokenizer, tiny_model, ids, mask, cfg)
    with torch.no_grad():
        seqs, decoded = sample_call(tiny_model, ids, mask, cfg)
        ref = tiny_model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)[:, ids.shape[1] :]
    for seq, row in zip(seqs, ref.tolist()):
        expect = row[: row.index(cfg.eos_token_id) + 1] if cfg.eos_token_id in row else row
        assert seq == expect  # same tokens as transformers' generate, rows cut at their EOS
    assert decoded == [len(s) for s in seqs]
    assert min(decoded) < max(decoded)  # rows did end at different steps, and the others went on
    # the fallback for models whose rows cannot leave (or sharded ones): same completions, every row decoded to the end
    with torch.no_grad():
        fb_seqs, fb_decoded = _generate_call(tiny_model, ids, mask, cfg)
    assert fb_seqs == seqs and fb_decoded == [ref.shape[1]] * len(seqs)


def test_next_token_filtering_matches_transformers_warpers():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, top_p in [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5)]:
        ref = TopPLogitsWarper(top_p)(None, TemperatureLogitsWarper(temperature)(None, logits.clone()))
        kept = torch.isfinite(ref)
        draws = torch.stack([_next_tokens(logits, temperature, top_p) for _ in range(300)])
        assert kept.gather(1, draws.T).all()  # only tokens transformers keeps are ever drawn
        # and with the kept tokens' probabilities: the most likely kept token is drawn about as often as it should be
        p = ref.softmax(-1)
        top = p.argmax(-1)
        freq = (draws == top).float().mean(0)
        assert torch.allclose(freq, p.gather(1, top[:, None]).squeeze(1), atol=0.12)


def test_rollouts_are_seeded(tokenizer, tiny_model):
    queries = query_dataset_from(addition_dataset(3, seed=1))
    a = generate_rollouts(tiny_model, tokenizer, queries, [0, 1], _args(), [digit_start_reward], seed=5)
    b = generate_rollouts(tiny_model, tokenizer, queries, [0, 1], _args(), [digit_start_reward], seed=5)
    c = generate_rollouts(tiny_model, tokenizer, queries, [0, 1], _args(), [digit_start_reward], seed=6)
    assert a.completion_ids == b.completion_ids != c.completion_ids


def test_conversational_rollouts_and_reward_columns(tokenizer, tiny_model):
    queries = query_dataset_from(addition_dataset(2, seed=3, conversational=True))
    seen = {}

    def reward(prompts, completions, answer, **kw):
        seen["answer"], seen["completions"] = answer, completions
        return [0.0] * len(completions)

    out = generate_rollouts(tiny_model, tokenizer, queries, [0, 1], _args(), [reward], seed=0)
    assert seen["answer"] == [queries[0]["answer"]] * 3 + [queries[1]["answer"]] * 3
    assert all(c[0]["role"] == "assistant" for c in seen["completions"])
    # prompt ids follow the chat template with the generation prompt
    assert out.prompt_ids[0][-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    rows = out.training_rows()
    assert all(r["labels"][: len(p)] == [-100] * len(p) for r, p in zip(rows, out.prompt_ids))


def test_generation_config_is_explicit(tokenizer):
    cfg = generation_config(_args(drift_top_p=0.9, drift_temperature=0.7), tokenizer)
    assert cfg.do_sample and cfg.top_k == 0 and cfg.top_p == 0.9 and cfg.temperature == 0.7
    assert cfg.max_new_tokens == 5 and cfg.pad_token_id == tokenizer.pad_token_id


def test_query_dataset_checks():
    with pytest.raises(ValueError, match="no query_dataset"):
        check_query_dataset(None)
    with pytest.raises(ValueError, match="no `prompt` column"):
        check_query_dataset(Dataset.from_dict({"question": ["1+1="]}))
    with pytest.raises(TypeError, match="datasets.Dataset"):
        check_query_dataset([{"prompt": "x"}])
    assert sample_queries(Dataset.from_dict({"prompt": ["a"] * 3}), 10, 0) == [0, 1, 2]
    picked = sample_queries(Dataset.from_dict({"prompt": ["a"] * 30}), 5, 0)
    assert len(set(picked)) == 5 and picked == sample_queries(Dataset.from_dict({"prompt": ["a"] * 30}), 5, 0)


class _Counter:
    calls = 0

    def update(self, n):
        self.calls += 1


class _OneRank:
    """A stand-in for core.dist.Dist on one of ``world`` ranks whose gather returns ``others`` around its own part."""

    def __init__(self, rank, world, others=None):
        self.rank, self.world_size, self.others = rank, world, others or {}

    def all_gather_object(self, obj):
        return [obj if r == self.rank else self.others.get(r, ([], [], [], [], None)) for r in range(self.world_size)]


def test_rollouts_shared_by_ranks_equal_single_process_ones(tokenizer, tiny_model):
    queries = query_dataset_from(addition_dataset(5, seed=1))
    args = _args()  # 5 queries x 3 rollouts = 15, batches of 4: 4 generate calls
    single = generate_rollouts(tiny_model, tokenizer, queries, [0, 1, 2, 3, 4], args, [digit_start_reward], seed=3)
    parts = []
    for rank in (0, 1):
        counter = _Counter()
        part = generate_rollouts(
            tiny_model,
            tokenizer,
            queries,
            [0, 1, 2, 3, 4],
            args,
            [digit_start_reward],
            seed=3,
            dist=_OneRank(rank, 2),
            progress=counter,
        )
        assert counter.calls == 2  # equal generate calls on every rank
        parts.append(part)
    merged = sorted((q, c, r) for p in parts for q, c, r in zip(p.query_index, p.completion_ids, p.rewards))
    assert len(merged) == len(single) == 15
    assert merged == sorted(zip(single.query_index, single.completion_ids, single.rewards))


def test_a_reward_failing_on_one_rank_fails_every_rank(tokenizer, tiny_model):
    queries = query_dataset_from(addition_dataset(2, seed=1))
    failed = ([], [], [], [], "KeyError: 'answer'")
    with pytest.raises(RuntimeError, match="Judging rollouts failed on a rank: KeyError"):
        generate_rollouts(
            tiny_model,
            tokenizer,
            queries,
            [0, 1],
            _args(),
            [digit_start_reward],
            seed=0,
            dist=_OneRank(0, 2, others={1: failed}),
        )

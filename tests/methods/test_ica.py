"""ICA: rows, retrieval, scores, weights, and DriftSFTTrainer(drift_method="ica")."""

import numpy as np
import pytest
import torch
from datasets import Dataset

from drift_trainer.cli.toy import addition_dataset
from drift_trainer.methods.ica import (
    ica_rows,
    ica_scores,
    ica_weights,
    minmax,
    retrieve,
    sequence_logps,
)
from tests.helpers import cpu_args


def test_ica_rows_share_response_tokens_and_prepend_demos(tokenizer):
    plain, ctx = ica_rows(tokenizer, "12+3=", "15", [("1+1=", "2"), ("2+2=", "4")])
    resp = [t for t in plain["labels"] if t != -100]
    assert resp == [t for t in ctx["labels"] if t != -100]
    assert tokenizer.decode(resp).replace(" ", "") == "15</s>"
    assert plain["input_ids"] == ctx["input_ids"][-len(plain["input_ids"]) :]  # candidate is the suffix
    assert tokenizer.decode(ctx["input_ids"]).replace(" ", "").startswith("1+1=2</s>2+2=4</s>12+3=")


def test_ica_rows_conversational(tokenizer):
    p = [{"role": "user", "content": "12+3="}]
    c = [{"role": "assistant", "content": "15"}]
    demo = ([{"role": "user", "content": "1+1="}], [{"role": "assistant", "content": "2"}])
    plain, ctx = ica_rows(tokenizer, p, c, [demo])
    assert tokenizer.decode([t for t in ctx["labels"] if t != -100]).replace(" ", "") == "15</s>"
    assert len(ctx["input_ids"]) > len(plain["input_ids"])
    assert "<|user|>1+1=" in tokenizer.decode(ctx["input_ids"]).replace(" ", "")


def test_retrieve_most_similar_first():
    cand = np.array([[1.0, 0.0], [0.0, 1.0]])
    hold = np.array([[0.0, 2.0], [1.0, 0.1], [1.0, 1.0], [-1.0, 0.0]])
    got = retrieve(cand, hold, 3)
    assert got.tolist() == [[1, 2, 0], [0, 2, 1]]
    assert retrieve(cand, hold, 10).shape == (2, 4)


def test_ica_score_is_context_gain(tokenizer, tiny_model):
    train = addition_dataset(4, seed=1)
    hold = addition_dataset(3, seed=2)
    scores = ica_scores(tiny_model, tokenizer, train, hold, num_demos=2)
    # recompute example 0 by hand with its two retrieved demos (embedding_fn makes the retrieval explicit)
    emb = lambda texts: np.asarray([[float(len(t)), 1.0 + i] for i, t in enumerate(texts)])  # noqa: E731
    s2 = ica_scores(tiny_model, tokenizer, train, hold, num_demos=2, embedding_fn=emb)
    hp = list(zip(hold["prompt"], hold["completion"]))
    idx = retrieve(emb(list(train["prompt"])), emb(list(hold["prompt"])), 2)[0]
    plain, ctx = ica_rows(tokenizer, train[0]["prompt"], train[0]["completion"], [hp[j] for j in idx])
    lp = sequence_logps(tiny_model, [plain, ctx], tokenizer.pad_token_id)
    assert s2[0] == pytest.approx(lp[1] - lp[0], abs=1e-4)
    assert scores.shape == (4,) and np.isfinite(scores).all() and np.abs(scores).max() > 0


def test_preference_score_is_antisymmetric(tokenizer, tiny_model):
    hold = addition_dataset(4, seed=2)
    pref = Dataset.from_dict(
        {"prompt": ["1+2=", "3+4=", "5+5="], "chosen": ["3", "7", "10"], "rejected": ["4", "9", "1"]}
    )
    swapped = Dataset.from_dict({"prompt": pref["prompt"], "chosen": pref["rejected"], "rejected": pref["chosen"]})
    a = ica_scores(tiny_model, tokenizer, pref, hold)
    b = ica_scores(tiny_model, tokenizer, swapped, hold)
    np.testing.assert_allclose(a, -b, atol=1e-5)
    assert np.abs(a).max() > 0


def test_minmax_and_rules():
    w = minmax(np.array([3.0, -1.0, 1.0]))
    np.testing.assert_allclose(w, [1.0, 0.0, 0.5])
    np.testing.assert_allclose(minmax(np.array([2.0, 2.0])), [1.0, 1.0])

    class A:
        drift_ica_weighting = "truncate"
        drift_truncate_low, drift_truncate_high = 20.0, 80.0
        drift_weight_clip, drift_uniform_mix = 5.0, 0.0

    w = ica_weights(np.arange(10.0), A())
    assert (w[[0, 9]] == 0).all() and (w[2:8] > 0).all() and w.mean() == pytest.approx(1.0)
    A.drift_ica_weighting = "minmax"
    assert ica_weights(np.arange(10.0), A()).max() == 1.0


def test_sft_trainer_ica_weights_the_loss(tokenizer, tiny_model, tmp_path):
    from drift_trainer import DriftConfig, DriftSFTTrainer

    train = addition_dataset(16, seed=3)
    args = DriftConfig(**cpu_args(tmp_path, max_steps=2, per_device_train_batch_size=8, drift_method="ica"))
    with pytest.raises(ValueError, match="holdout_dataset"):
        DriftSFTTrainer(model=tiny_model, args=args, train_dataset=train, processing_class=tokenizer)
    trainer = DriftSFTTrainer(
        model=tiny_model,
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        holdout_dataset=addition_dataset(6, seed=4),
    )
    trainer.train()
    w = trainer.ica_callback.weights
    assert w.shape == (16,) and w.min() == 0.0 and w.max() == 1.0  # min-max, in [0, 1] before normalisation
    assert np.argmin(w) == np.argmin(trainer.ica_callback.scores)
    lw = trainer._drift_loss_weights()
    assert lw.mean() == pytest.approx(1.0) and np.argmax(lw) == np.argmax(w)
    # the weighted loss uses the weights: uniform weights give the plain loss, ICA weights another one
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    with torch.no_grad():
        weighted = trainer.compute_loss(trainer.model, dict(batch)).item()
        trainer.ica_callback.weights = np.ones(16)
        uniform = trainer.compute_loss(trainer.model, dict(batch)).item()
        plain = {k: v for k, v in batch.items() if k != "drift_index"}
        reference = super(DriftSFTTrainer, trainer).compute_loss(trainer.model, plain).item()
    assert uniform == pytest.approx(reference, rel=1e-5)
    assert weighted != pytest.approx(uniform, rel=1e-4)

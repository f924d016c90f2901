"""ICA reweighting (in-context approximation, arXiv 2510.14459): a forward-only data-value score.

``s(x, y) = log p(y | D_ho(x), x) - log p(y | x)``: how much likelier the model finds an example's response once the
``k`` holdout examples most similar to its prompt are shown as demonstrations. Log-probabilities are summed over the
response tokens. For a preference pair the score is the chosen-minus-rejected difference
``[lp_ctx(y_w) - lp_ctx(y_l)] - [lp(y_w) - lp(y_l)]``. No reference model, no gradients.

Weights are the min-max normalised scores, in [0, 1], used as per-example loss weights ``sum_i w_i L_i / sum_i w_i``
(the paper's rule), or, with ``drift_ica_weighting`` set to a ``drift_weighting`` rule (``softmax``, ``prune``,
``truncate``), the usual DRIFT weights from the same scores.

Holdout retrieval: cosine similarity of prompt embeddings; by default the mean-pooled last hidden states of the model
being trained (no sentence-embedding model is needed offline), or any ``embedding_fn(texts) -> (n, d) array``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence

import numpy as np
import torch
from trl.data_utils import common_prefix_length

from drift_trainer.core.features import IGNORE_INDEX, collate_right, summed_logps
from drift_trainer.core.params import WeightingParams
from drift_trainer.core.rollouts import is_conversational_prompt
from drift_trainer.core.weighting import scores_to_weights

logger = logging.getLogger("drift_trainer")

ICA_WEIGHTINGS = ("minmax", "softmax", "prune", "truncate")
EmbeddingFn = Callable[[list[str]], np.ndarray]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text=text, add_special_tokens=False)["input_ids"])


def _chat_text(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def prompt_text(tokenizer, prompt) -> str:
    """The prompt as the model reads it (chat template applied to messages)."""
    return _chat_text(tokenizer, prompt, True) if is_conversational_prompt(prompt) else str(prompt)


def _demo_prefix(tokenizer, demos: Sequence[tuple], conversational: bool):
    """Demonstrations ``(prompt, completion)`` as text (text data) or as a message list (conversational data)."""
    if conversational:
        return [m for p, c in demos for m in (list(p) + list(c))]
    eos = tokenizer.eos_token or ""
    return "".join(str(p) + str(c) + eos for p, c in demos)


def ica_rows(tokenizer, prompt, completion, demos: Sequence[tuple]) -> tuple[dict, dict]:
    """Two tokenized rows for one candidate: ``(plain, in_context)``, with the same response tokens as labels.

    Text data: response = completion + EOS (as TRL appends it); the demonstrations are ``prompt + completion + EOS``
    strings placed before the prompt. Conversational data: the demonstrations are earlier user/assistant turns of the
    same chat; the response tokens are where ``prompt + completion`` and ``prompt`` rendered alone diverge.
    """
    conversational = is_conversational_prompt(prompt)
    if conversational:
        p_full = _ids(tokenizer, _chat_text(tokenizer, prompt, True))
        pc_ids = _ids(tokenizer, _chat_text(tokenizer, list(prompt) + list(completion), False))
        cut = common_prefix_length(p_full, pc_ids)
        p_ids, y_ids = pc_ids[:cut], pc_ids[cut:]
        ctx_full = _ids(tokenizer, _chat_text(tokenizer, _demo_prefix(tokenizer, demos, True) + list(prompt), True))
        ctx_ids = ctx_full[: len(ctx_full) - (len(p_full) - cut)]  # drop the prompt end the response re-renders
    else:
        eos = tokenizer.eos_token or ""
        text_c = str(completion) if str(completion).endswith(eos) else str(completion) + eos
        p_ids = _ids(tokenizer, str(prompt))
        pc_ids = _ids(tokenizer, str(prompt) + text_c)
        cut = common_prefix_length(p_ids, pc_ids)
        p_ids, y_ids = pc_ids[:cut], pc_ids[cut:]
        ctx_ids = _ids(tokenizer, _demo_prefix(tokenizer, demos, False)) + p_ids
    plain = {"input_ids": p_ids + y_ids, "labels": [IGNORE_INDEX] * len(p_ids) + y_ids}
    ctx = {"input_ids": ctx_ids + y_ids, "labels": [IGNORE_INDEX] * len(ctx_ids) + y_ids}
    return plain, ctx


# ---------------------------------------------------------------------------------------------------------- model
def sequence_logps(model, rows: Sequence[dict], pad_token_id: int, batch_size: int = 16, dist=None) -> np.ndarray:
    """Summed log-probability of each row's labelled tokens (n,), float64; forward passes only, eval mode (split
    over the ranks of ``dist``, see :func:`~drift_trainer.core.features.summed_logps`)."""
    return summed_logps(model, rows, pad_token_id, batch_size, dist)[0]


@torch.no_grad()
def model_embeddings(model, tokenizer, texts: Sequence[str], batch_size: int = 16, dist=None) -> np.ndarray:
    """Mean-pooled last hidden state of each text (n, hidden), float64: the offline stand-in for a sentence encoder.
    With ``dist`` over several ranks the batches are split between them (equal forwards) and every rank returns all."""
    from drift_trainer.core.dist import rank_calls, sum_over_ranks

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    rows = [{"input_ids": _ids(tokenizer, t) or [pad], "labels": []} for t in texts]
    for r in rows:
        r["labels"] = [IGNORE_INDEX] * len(r["input_ids"])
    starts = list(range(0, len(rows), batch_size))
    out = None
    was_training = model.training
    model.eval()
    try:
        for b, keep in rank_calls(len(starts), dist) if starts else []:
            s = starts[b]
            batch = collate_right(rows[s : s + batch_size], pad, device)
            h = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                output_hidden_states=True,
                use_cache=False,
            ).hidden_states[-1]
            m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
            pooled = ((h * m).sum(1) / m.sum(1).clamp(min=1)).double().cpu().numpy()
            if out is None:
                out = np.zeros((len(rows), pooled.shape[1]))
            if keep:
                out[s : s + len(pooled)] = pooled
    finally:
        model.train(was_training)
    if out is None:
        return np.zeros((0, 0))
    return sum_over_ranks([out], dist)[0]


def retrieve(candidate_emb: np.ndarray, holdout_emb: np.ndarray, k: int) -> np.ndarray:
    """Indices (n, min(k, m)) of the ``k`` holdout rows most cosine-similar to each candidate, most similar first."""
    a = np.asarray(candidate_emb, dtype=np.float64)
    b = np.asarray(holdout_emb, dtype=np.float64)
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    sim = a @ b.T
    k = min(int(k), b.shape[0])
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def _holdout_pairs(holdout_dataset) -> list[tuple]:
    """``(prompt, completion)`` of each holdout row: its ``completion``, else its ``chosen`` response."""
    cols = holdout_dataset.column_names
    target = "completion" if "completion" in cols else "chosen" if "chosen" in cols else None
    if "prompt" not in cols or target is None:
        raise ValueError(
            "ICA needs a holdout_dataset with a `prompt` column and a `completion` (SFT) or `chosen` (preference) "
            f"column; got columns {cols}."
        )
    return list(zip(holdout_dataset["prompt"], holdout_dataset[target]))


def ica_scores(
    model,
    tokenizer,
    dataset,
    holdout_dataset,
    num_demos: int = 3,
    embedding_fn: EmbeddingFn | None = None,
    batch_size: int = 16,
    dist=None,
) -> np.ndarray:
    """ICA score of every row of ``dataset`` (n,), float64. ``dist``: split the forwards over its ranks (every rank
    must call; each ends with every score).

    ``dataset`` has ``prompt`` and ``completion`` columns (SFT: ``s = lp_ctx(y) - lp(y)``) or ``prompt``, ``chosen``
    and ``rejected`` (preference: ``s = [lp_ctx(y_w) - lp_ctx(y_l)] - [lp(y_w) - lp(y_l)]``); text or messages.
    """
    cols = dataset.column_names
    preference = "chosen" in cols and "rejected" in cols
    if "prompt" not in cols or not (preference or "completion" in cols):
        raise ValueError(
            "ICA scores prompt-completion data (`prompt`, `completion`) or preference data (`prompt`, `chosen`, "
            f"`rejected`); got columns {cols}."
        )
    holdout = _holdout_pairs(holdout_dataset)
    if not holdout:
        raise ValueError("ICA needs a non-empty holdout_dataset.")
    prompts = list(dataset["prompt"])
    cand_text = [prompt_text(tokenizer, p) for p in prompts]
    hold_text = [prompt_text(tokenizer, p) for p, _ in holdout]
    if embedding_fn is None:
        emb_c = model_embeddings(model, tokenizer, cand_text, batch_size, dist)
        emb_h = model_embeddings(model, tokenizer, hold_text, batch_size, dist)
    else:
        emb_c, emb_h = np.asarray(embedding_fn(cand_text)), np.asarray(embedding_fn(hold_text))
    nearest = retrieve(emb_c, emb_h, num_demos)
    responses = [dataset["chosen"], dataset["rejected"]] if preference else [dataset["completion"]]
    rows: list[dict] = []
    for resp in responses:
        for i, (p, y) in enumerate(zip(prompts, resp)):
            plain, ctx = ica_rows(tokenizer, p, y, [holdout[j] for j in nearest[i]])
            rows.extend([plain, ctx])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    lp = sequence_logps(model, rows, pad, batch_size, dist).reshape(len(responses), len(prompts), 2)
    gain = lp[..., 1] - lp[..., 0]  # (responses, n): lp_ctx - lp
    return gain[0] - gain[1] if preference else gain[0]


def minmax(scores: np.ndarray) -> np.ndarray:
    """Min-max normalised scores in [0, 1]; all ones when every score is equal (no information: no reweighting)."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) == 0:
        return s
    lo, hi = s.min(), s.max()
    return np.ones_like(s) if hi - lo <= 0 else (s - lo) / (hi - lo)


def ica_weights(scores: np.ndarray, args) -> np.ndarray:
    """Loss weights from ICA scores: ``minmax`` in [0, 1], or a ``drift_weighting`` rule (mean 1) by
    ``args.drift_ica_weighting``."""
    rule = getattr(args, "drift_ica_weighting", "minmax")
    if rule == "minmax":
        return minmax(scores)
    return scores_to_weights(scores, dataclasses.replace(WeightingParams.of(args), weighting=rule))

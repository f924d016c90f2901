"""On-policy rollouts: batched, left-padded sampling from the model being trained, judged by reward functions."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch
from datasets import Dataset
from transformers import GenerationConfig

from drift_trainer.core.dist import rank_calls
from drift_trainer.core.features import IGNORE_INDEX
from drift_trainer.core.params import RolloutParams
from drift_trainer.core.rewards import compute_rewards


@dataclass
class Rollouts:
    """Sampled completions of one refresh; lists are aligned, one entry per rollout."""

    query_index: list[int] = field(default_factory=list)  # row of the query dataset
    prompts: list = field(default_factory=list)  # the query's prompt (text or messages)
    completions: list = field(default_factory=list)  # text, or [{"role": "assistant", "content": ...}]
    prompt_ids: list[list[int]] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)  # up to and including the first EOS
    rewards: list[float] = field(default_factory=list)
    decode_steps: list[int] = field(default_factory=list)  # tokens decoded for the row (its own, unless generate ran)

    def __len__(self) -> int:
        return len(self.rewards)

    def extend(self, other: Rollouts) -> Rollouts:
        """These rollouts followed by ``other``'s (a new object)."""
        return Rollouts(**{f.name: list(getattr(self, f.name)) + list(getattr(other, f.name)) for f in fields(self)})

    def training_rows(self) -> list[dict]:
        """Each rollout as a tokenized example whose labels are its completion tokens (prompt masked)."""
        return [
            {"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + c}
            for p, c in zip(self.prompt_ids, self.completion_ids)
        ]


def is_conversational_prompt(prompt) -> bool:
    return isinstance(prompt, list) and bool(prompt) and isinstance(prompt[0], dict) and "role" in prompt[0]


def tokenize_prompt(tokenizer, prompt) -> list[int]:
    """Token ids of a prompt as SFTTrainer tokenizes it: chat template with generation prompt for messages,
    plain ``tokenizer(text)`` otherwise."""
    if is_conversational_prompt(prompt):
        out = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])
    if not isinstance(prompt, str):
        raise ValueError(f"query_dataset `prompt` must be a string or a list of messages; got {type(prompt).__name__}.")
    return list(tokenizer(text=prompt)["input_ids"])


def check_query_dataset(query_dataset) -> None:
    """Raise a clear error for a query dataset DRIFT cannot use."""
    if query_dataset is None:
        raise ValueError(
            "DRIFT is enabled but no query_dataset was given: pass query_dataset=Dataset with a `prompt` column "
            "(and the columns your reward functions need), or --drift_query_dataset FILE_OR_HUB_ID, or set "
            "drift_enabled=False."
        )
    if not isinstance(query_dataset, Dataset):
        raise TypeError(
            f"query_dataset must be a datasets.Dataset; got {type(query_dataset).__name__}. "
            "Build one with Dataset.from_list([...]) or Dataset.from_dict({...})."
        )
    if "prompt" not in query_dataset.column_names:
        raise ValueError(
            f"query_dataset has no `prompt` column (columns: {query_dataset.column_names}). Rename the column that "
            "holds the question to `prompt` (text or a list of chat messages)."
        )
    if len(query_dataset) == 0:
        raise ValueError("query_dataset is empty: DRIFT needs at least one validation query.")


def dataset_format(dataset) -> str | None:
    """``"conversational"`` (chat messages), ``"text"`` (plain strings), ``"tokenized"`` (``input_ids`` only) or None
    (unknown), judged from the first row as TRL's ``is_conversational`` does."""
    columns = set(getattr(dataset, "column_names", None) or [])
    if not columns or len(dataset) == 0:
        return None
    row = dataset[0]
    for key in ("messages", "prompt", "completion"):
        if key in columns and is_conversational_prompt(row[key]):
            return "conversational"
    if columns & {"prompt", "text", "completion"}:
        return "text"
    return "tokenized" if "input_ids" in columns else None


def check_query_format(query_dataset, train_format: str | None, tokenizer) -> None:
    """Before training: conversational queries need a chat template (else raise ``ValueError``); queries formatted
    unlike the train rows (chat messages vs plain text) are warned about, since the model's rollouts on them are
    unlikely to contrast."""
    import logging

    query_format = dataset_format(query_dataset)
    if query_format == "conversational" and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "query_dataset's prompts are chat messages, but the tokenizer has no chat template to render them. Set "
            "tokenizer.chat_template, or give the queries plain-text prompts formatted as the train rows are."
        )
    if train_format in ("conversational", "text") and query_format != train_format:
        logging.getLogger("drift_trainer").warning(
            "DRIFT: the query prompts are %s but the train rows are %s. Rollouts on queries formatted unlike the "
            "train data rarely get a mix of right and wrong answers, so refreshes may find no contrast and change "
            "nothing. Format the queries as the train rows are (the same chat template or prompt text).",
            "chat messages" if query_format == "conversational" else "plain text",
            "chat messages" if train_format == "conversational" else "plain text",
        )


def sample_queries(query_dataset: Dataset, num: int, seed: int) -> list[int]:
    """Seeded choice of ``num`` query rows (all of them, in order, if there are fewer)."""
    n = len(query_dataset)
    if num >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, size=num, replace=False).tolist())


def generation_config(params, tokenizer) -> GenerationConfig:
    """Explicit sampling settings (a :class:`RolloutParams` or a config): nothing is inherited from the model's own
    generation config."""
    p = RolloutParams.of(params)
    eos = tokenizer.eos_token_id
    return GenerationConfig(
        do_sample=True,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=0,
        max_new_tokens=p.max_new_tokens,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
        eos_token_id=eos,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=True,
        disable_compile=True,
    )


def _left_pad(seqs: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.as_tensor(s)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


def _cut_at_eos(ids: list[int], eos: int | None, pad: int | None) -> list[int]:
    if eos is not None and eos in ids:
        return ids[: ids.index(eos) + 1]
    if pad is not None and pad != eos:
        while ids and ids[-1] == pad:
            ids = ids[:-1]
    return ids


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One sampled token per row from last-position ``logits`` (rows x vocab): temperature, then nucleus filtering as
    ``transformers``' ``TopPLogitsWarper`` does it (the smallest set of most likely tokens whose mass exceeds
    ``top_p``, at least one), then a draw from the global RNG."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1).squeeze(1)


def _is_sharded(model) -> bool:
    """Whether the model's parameters are sharded across ranks (FSDP2 DTensors, or ZeRO-3 partitions that were not
    gathered): its forward then runs collectives, so every rank must make the same forward calls."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) or (hasattr(p, "ds_id") and p.data.numel() == 0) for p in model.parameters())


def sample_call(model, ids: torch.Tensor, mask: torch.Tensor, gen_cfg: GenerationConfig, sharded: bool = False):
    """Sample one ``generate`` call's completions (left-padded ``ids`` / ``mask``): each row's ids up to and including
    its first EOS, and how many tokens were decoded for it.

    Each row leaves the batch at its own EOS: the KV cache keeps only the rows still running, so a call costs the
    tokens its rows generate, not rows x its longest completion. The sampling is ``gen_cfg``'s (temperature, top-p)
    on float32 logits. Falls back to ``model.generate`` (every row decoded until the last one stops) where rows cannot
    leave: a model whose cache cannot drop rows, or parameters sharded across ranks (``sharded``, see
    :func:`_is_sharded`), whose forwards must line up on every rank."""
    if sharded:
        return _generate_call(model, ids, mask, gen_cfg, synced_gpus=True)
    eos, max_new = gen_cfg.eos_token_id, int(gen_cfg.max_new_tokens)
    rows = ids.shape[0]
    out: list[list[int]] = [[] for _ in range(rows)]
    if max_new <= 0 or rows == 0:
        return out, [0] * rows
    live = torch.arange(rows, device=ids.device)  # batch position -> row
    position = (mask.long().cumsum(-1) - 1).clamp(min=0)
    kwargs = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    cache_arg = "cache" if _accepts(model, "cache") else "past_key_values"  # renamed in transformers 5.x
    res = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, **kwargs)
    cache = _cache_of(res)
    if not hasattr(cache, "batch_select_indices"):
        return _generate_call(model, ids, mask, gen_cfg)
    last = position[:, -1]
    logits = res.logits[:, -1]
    for step in range(max_new):
        tok = _next_tokens(logits, gen_cfg.temperature, gen_cfg.top_p)
        for r, t in zip(live.tolist(), tok.tolist()):
            out[r].append(t)
        keep = tok != eos if eos is not None else torch.ones_like(tok, dtype=torch.bool)
        if step == max_new - 1 or not bool(keep.any()):
            break
        if not bool(keep.all()):
            idx = keep.nonzero().squeeze(1)
            cache.batch_select_indices(idx)
            live, tok, mask, last = live[idx], tok[idx], mask[idx], last[idx]
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        last = last + 1
        res = model(
            input_ids=tok[:, None],
            attention_mask=mask,
            position_ids=last[:, None],
            **{cache_arg: cache},
            use_cache=True,
            **kwargs,
        )
        cache, logits = _cache_of(res), res.logits[:, -1]
    return out, [len(o) for o in out]


def _cache_of(output):
    """The KV cache a forward returned (``cache`` in newer transformers, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


def _accepts(model, name: str) -> bool:
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        return name in inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return False


def _generate_call(model, ids, mask, gen_cfg, synced_gpus: bool | None = None):
    """One ``model.generate`` call: each row's completion cut at its first EOS, and the tokens decoded per row (every
    row runs until the call's last row stops)."""
    extra = {"synced_gpus": True} if synced_gpus else {}
    gen = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg, **extra)
    width = gen.shape[1] - ids.shape[1]
    seqs = [_cut_at_eos(seq, gen_cfg.eos_token_id, gen_cfg.pad_token_id) for seq in gen[:, ids.shape[1] :].tolist()]
    return seqs, [width] * len(seqs)


def length_batches(prompt_lengths: list[int], batch_size: int, max_new_tokens: int) -> list[list[int]]:
    """The ``generate`` calls of one refresh, chosen by length: prompts shortest first, each call at most
    ``batch_size`` rollouts and at most ``batch_size x (mean prompt length + max_new_tokens)`` tokens (its rows padded
    to its longest prompt), so calls of long prompts carry fewer rows and each pads little. Each call lists its
    rollouts in their original order."""
    lengths = np.asarray(prompt_lengths, dtype=np.int64)
    if not len(lengths):
        return []
    budget = batch_size * (float(lengths.mean()) + max_new_tokens)
    batches, current = [], []
    for i in np.argsort(lengths, kind="stable").tolist():  # ascending: row i is the longest of its call so far
        if current and (len(current) >= batch_size or (len(current) + 1) * (lengths[i] + max_new_tokens) > budget):
            batches.append(sorted(current))
            current = []
        current.append(i)
    batches.append(sorted(current))
    return batches


def generate_rollouts(
    model,
    tokenizer,
    query_dataset: Dataset,
    query_rows: list[int],
    params,
    reward_funcs,
    seed: int,
    num_calls: int | None = None,
    progress=None,
    dist=None,
) -> Rollouts:
    """Sample ``params.num_rollouts`` completions per query row and judge them (``params``: a :class:`RolloutParams`
    or a config).

    ``model`` must already be ready for generation (unwrapped / gathered). Runs in eval mode without grad and restores
    the previous mode. The rollouts are cut into ``generate`` calls by length (:func:`length_batches`); call ``c`` samples
    under ``torch.random.fork_rng`` seeded by ``seed + c``, so the training RNG stream is left as it was and the
    rollouts do not depend on how many processes share the work. With ``dist`` (a :class:`refresh.Dist` over several
    ranks) rank ``r`` makes calls ``r, r + world, ...`` and judges its own rollouts; every rank makes the same number of
    ``generate`` calls (ZeRO-3 needs it; spare calls repeat one and are discarded) and all ranks end with every rollout,
    in the same order. ``num_calls``: make at least this many calls per rank.
    """
    params = RolloutParams.of(params)
    gen_cfg = generation_config(params, tokenizer)
    k = params.num_rollouts
    rows = [query_dataset[int(i)] for i in query_rows]
    flat = [(qi, row) for qi, row in zip(query_rows, rows) for _ in range(k)]
    prompt_ids = [tokenize_prompt(tokenizer, row["prompt"]) for _, row in flat]
    batches = length_batches([len(p) for p in prompt_ids], max(1, params.batch_size), params.max_new_tokens)
    world = dist.world_size if dist is not None else 1
    calls = rank_calls(len(batches), dist, num_calls or 0) if batches else []
    sharded = world > 1 and _is_sharded(model)  # once per refresh, not per call
    device = next(model.parameters()).device
    pad = gen_cfg.pad_token_id
    done: dict[int, list[int]] = {}  # flat index -> completion ids (this rank's rollouts)
    steps: dict[int, int] = {}  # flat index -> tokens its call decoded (the call runs until its last row's EOS)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for c, keep in calls:
                torch.manual_seed(seed + c)
                ids, mask = _left_pad([prompt_ids[i] for i in batches[c]], pad, device)
                seqs, decoded = sample_call(model, ids, mask, gen_cfg, sharded=sharded)
                if progress is not None:
                    progress.update(1)
                if keep:
                    for row_i, seq, n in zip(batches[c], seqs, decoded):
                        done[row_i] = seq
                        steps[row_i] = n
    finally:
        model.train(was_training)
    local = sorted(done)
    rewards, error = [], None
    try:
        rewards = _judge(tokenizer, query_dataset, flat, [done[i] for i in local], local, reward_funcs)
    except Exception as exc:  # every rank must reach the gather below before anyone raises
        if dist is None or world == 1:
            raise
        error = f"{type(exc).__name__}: {exc}"
    parts = [(local, [done[i] for i in local], rewards, [steps[i] for i in local], error)]
    if dist is not None and world > 1:
        parts = dist.all_gather_object(parts[0])
    errors = [e for *_, e in parts if e]
    if errors:
        raise RuntimeError(f"Judging rollouts failed on a rank: {errors[0]}")
    merged = sorted((i, comp, r, n) for idx, comps, rws, ns, _ in parts for i, comp, r, n in zip(idx, comps, rws, ns))
    out = Rollouts()
    for i, comp, reward, n in merged:
        qi, row = flat[i]
        out.query_index.append(int(qi))
        out.prompts.append(row["prompt"])
        out.prompt_ids.append(prompt_ids[i])
        out.completion_ids.append(comp)
        out.rewards.append(reward)
        out.decode_steps.append(int(n))
    out.completions = _completions(tokenizer, out.prompts, out.completion_ids)
    return out


def _completions(tokenizer, prompts: list, completion_ids: list[list[int]]) -> list:
    """Decoded completions in the prompts' format: text, or one assistant message for conversational prompts."""
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    conversational = bool(prompts) and is_conversational_prompt(prompts[0])
    return [[{"role": "assistant", "content": t}] if conversational else t for t in texts]


def _judge(tokenizer, query_dataset, flat, completion_ids, flat_index, reward_funcs) -> list[float]:
    """Summed rewards of the rollouts ``flat_index`` (rows of ``flat``) with the given completion ids."""
    if not flat_index:
        return []
    prompts = [flat[i][1]["prompt"] for i in flat_index]
    completions = _completions(tokenizer, prompts, completion_ids)
    columns = {c: [flat[i][1][c] for i in flat_index] for c in query_dataset.column_names if c != "prompt"}
    return compute_rewards(reward_funcs, prompts, completions, columns)

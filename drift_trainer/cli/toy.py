"""Offline building blocks: a character tokenizer, tiny Llama models and synthetic tasks.

Nothing here touches a model hub. The demo, the tests and the benchmarks build their models from a config with random
init, a tokenizer built by :func:`build_char_tokenizer`, and data from :func:`addition_dataset`, whose answers can be
checked and whose corrupted rows are known.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass

from datasets import Dataset

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}<|user|>{{ message['content'] }}"
    "{% elif message['role'] == 'system' %}<|system|>{{ message['content'] }}"
    "{% elif message['role'] == 'assistant' %}<|assistant|>{% generation %}{{ message['content'] }}</s>"
    "{% endgeneration %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
ALPHABET = list("0123456789+-*=#?:;., ") + [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("{}\\()")


def build_char_tokenizer(save_dir: str | None = None):
    """Build a character-level ``PreTrainedTokenizerFast`` with a chat template, saved and reloaded from disk.

    Returns the tokenizer reloaded with ``from_pretrained`` from ``save_dir`` (a temporary directory if None), so it
    behaves exactly like one a user would load. Pad is ``<pad>``, EOS ``</s>``, BOS ``<s>`` (not added to plain text).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + ALPHABET)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters decode back without spaces between them ("46", not "4 6")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        unk_token="<unk>",
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    save_dir = save_dir or tempfile.mkdtemp(prefix="drift-tok-")
    fast.save_pretrained(save_dir)
    return PreTrainedTokenizerFast.from_pretrained(save_dir)


def build_tiny_llama(tokenizer, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` sized for CPU tests (about 0.1M parameters at the defaults)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


@dataclass
class Corruption:
    """Which training rows get a wrong answer, and how.

    ``kind``: ``"none"``, ``"random"`` (a random wrong number), ``"systematic"`` (the carry is dropped: a consistent,
    plausible wrong rule) or ``"format"`` (the right number in another format, ``#<answer>``: learnable, yet judged
    wrong by ``exact_match``). ``fraction``: share of rows corrupted.
    """

    kind: str = "random"
    fraction: float = 0.3


def _wrong_answer(a: int, b: int, kind: str, rng: random.Random) -> str:
    true = a + b
    if kind == "random":
        wrong = true
        while wrong == true:
            wrong = rng.randint(0, 198)
        return str(wrong)
    if kind == "systematic":
        no_carry = (a // 10 + b // 10) * 10 + (a % 10 + b % 10) % 10
        return str(no_carry if no_carry != true else true + 10)
    if kind == "format":
        return f"#{true}"
    raise ValueError(f"unknown corruption kind {kind!r}; use one of 'none', 'random', 'systematic', 'format'")


def addition_dataset(
    n: int,
    seed: int = 0,
    corruption: Corruption | None = None,
    conversational: bool = False,
    carry_only: bool = False,
) -> Dataset:
    """Two-digit addition as prompt-completion data: prompt ``"12+34="``, completion ``"46"``.

    Columns: ``prompt``, ``completion``, ``answer`` (the true answer, for rewards and tests) and ``corrupted`` (bool,
    True where the completion was made wrong). With ``conversational`` the prompt and completion are message lists.
    ``carry_only`` draws only pairs whose units digits carry (the ones a ``systematic`` corruption changes).
    """
    rng = random.Random(seed)
    corruption = corruption or Corruption("none", 0.0)
    rows = {"prompt": [], "completion": [], "answer": [], "corrupted": []}
    for _ in range(n):
        while True:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            if not carry_only or (a % 10 + b % 10) >= 10:
                break
        corrupt = corruption.kind != "none" and rng.random() < corruption.fraction
        if corruption.kind == "systematic" and (a % 10 + b % 10) < 10:
            corrupt = False  # the dropped-carry rule only changes carrying pairs
        answer = str(a + b)
        completion = _wrong_answer(a, b, corruption.kind, rng) if corrupt else answer
        prompt = f"{a}+{b}="
        if conversational:
            rows["prompt"].append([{"role": "user", "content": prompt}])
            rows["completion"].append([{"role": "assistant", "content": completion}])
        else:
            rows["prompt"].append(prompt)
            rows["completion"].append(completion)
        rows["answer"].append(answer)
        rows["corrupted"].append(corrupt)
    return Dataset.from_dict(rows)


def query_dataset_from(ds: Dataset) -> Dataset:
    """Validation queries from an addition dataset: its ``prompt`` and ``answer`` columns (no completion)."""
    return ds.select_columns(["prompt", "answer"])


def offline_env() -> None:
    """Make sure no code path reaches for a hub (used by the CLI demo and tests)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


TASKS = ("add", "sub", "mul")


def mixture_dataset(n: int, seed: int = 0, tasks: tuple[str, ...] = TASKS, target: str = "add") -> Dataset:
    """A mixture of arithmetic tasks in equal shares: ``add`` (two-digit addition, ``"12+34="``), ``sub`` (``"57-23="``,
    never negative) and ``mul`` (two digits times one, ``"23*4="``). Columns as :func:`addition_dataset`, plus ``task``;
    ``corrupted`` marks the rows *off* the ``target`` task (the rows a targeted fine-tune should not spend steps on).
    """
    rng = random.Random(seed)
    rows = {"prompt": [], "completion": [], "answer": [], "corrupted": [], "task": []}
    for i in range(n):
        task = tasks[i % len(tasks)]
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if task == "add":
            prompt, answer = f"{a}+{b}=", a + b
        elif task == "sub":
            a, b = max(a, b), min(a, b)
            prompt, answer = f"{a}-{b}=", a - b
        elif task == "mul":
            b = rng.randint(2, 9)
            prompt, answer = f"{a}*{b}=", a * b
        else:
            raise ValueError(f"unknown task {task!r}; use {TASKS}")
        rows["prompt"].append(prompt)
        rows["completion"].append(str(answer))
        rows["answer"].append(str(answer))
        rows["corrupted"].append(task != target)
        rows["task"].append(task)
    order = list(range(n))
    rng.shuffle(order)
    return Dataset.from_dict({k: [v[i] for i in order] for k, v in rows.items()})

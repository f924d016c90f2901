"""Reward functions in TRL's convention and the code that calls them safely.

A reward function is ``f(prompts, completions, **columns) -> list[float]``: the same callables a user passes to
``GRPOTrainer(reward_funcs=...)``. ``completions`` are strings for plain-text prompts and one-message lists
(``[{"role": "assistant", "content": ...}]``) for conversational prompts; every other column of the query dataset is
passed by name, one value per completion.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

RewardFunc = Callable[..., list]


def completion_text(completion) -> str:
    """The text of a completion in either format (string, or list of messages: the last message's content)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def _reference(kwargs: dict, n: int, name: str) -> list:
    for key in ("answer", "solution", "reference", "ground_truth"):
        if key in kwargs and kwargs[key] is not None:
            return list(kwargs[key])
    raise ValueError(
        f"{name} needs the reference answers: give the query dataset an `answer` (or `solution`) column; "
        f"got columns {sorted(kwargs)}."
    )


def exact_match(prompts, completions, **kwargs) -> list[float]:
    """1.0 where the completion, stripped of surrounding whitespace, equals the reference answer, else 0.0.

    Reads the reference from the query dataset's ``answer`` (or ``solution``) column.
    """
    refs = _reference(kwargs, len(completions), "exact_match")
    return [float(completion_text(c).strip() == str(r).strip()) for c, r in zip(completions, refs)]


_BOXED = re.compile(r"\\boxed\{")
_HASHES = re.compile(r"####\s*([^\n]+)")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def _boxed_content(text: str) -> str | None:
    starts = [m.end() for m in _BOXED.finditer(text)]
    if not starts:
        return None
    i, depth = starts[-1], 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def _marked_answer(text: str) -> str | None:
    """The answer marked by ``\\boxed{}`` or ``####`` (None when unmarked)."""
    boxed = _boxed_content(text)
    if boxed is not None:
        return boxed.strip()
    hashes = _HASHES.findall(text)
    return hashes[-1].strip() if hashes else None


def extract_final_answer(text: str) -> str | None:
    """The final answer of a solution: the last ``\\boxed{...}``, else what follows ``####``, else the last number."""
    marked = _marked_answer(text)
    if marked is not None:
        return marked
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _as_number(text: str) -> float | None:
    text = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def math_answer(prompts, completions, **kwargs) -> list[float]:
    """1.0 where the completion's final answer (``\\boxed{}``, ``####`` or last number) matches the reference.

    Numbers compare by value (``1,000`` == ``1000.0``, ``1/2`` == ``0.5``); anything else by stripped text. The
    reference may itself be a full solution: its ``\\boxed{}`` / ``####`` answer is used, else the whole reference.
    """
    refs = _reference(kwargs, len(completions), "math_answer")
    out = []
    for c, r in zip(completions, refs):
        got = extract_final_answer(completion_text(c))
        want = _marked_answer(str(r)) or str(r).strip()
        if got is None:
            out.append(0.0)
            continue
        a, b = _as_number(got), _as_number(want)
        out.append(
            float(math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9) if a is not None and b is not None else got == want)
        )
    return out


BUILTIN_REWARDS: dict[str, RewardFunc] = {"exact_match": exact_match, "math_answer": math_answer}


def resolve_reward_funcs(reward_funcs) -> list[RewardFunc]:
    """Normalise ``reward_funcs`` (a callable, a built-in name, ``module:function``, or a list of them) to callables."""
    if reward_funcs is None:
        return []
    if callable(reward_funcs) or isinstance(reward_funcs, str):
        reward_funcs = [reward_funcs]
    # names may also come comma-separated in one string (a YAML scalar, `--drift_reward_funcs a,b`)
    items = []
    for f in reward_funcs:
        items.extend(part.strip() for part in f.split(",")) if isinstance(f, str) else items.append(f)
    reward_funcs = items
    out = []
    for f in reward_funcs:
        if isinstance(f, str) and not f:
            continue
        if isinstance(f, str):
            f = load_reward(f)
        if not callable(f):
            raise TypeError(f"reward_funcs must be callables or names; got {f!r} of type {type(f).__name__}.")
        out.append(f)
    return out


def load_reward(spec: str) -> RewardFunc:
    """A built-in reward by name (``exact_match``, ``math_answer``) or ``package.module:function``."""
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" not in spec:
        raise ValueError(f"Unknown reward {spec!r}: use one of {sorted(BUILTIN_REWARDS)} or 'package.module:function'.")
    import importlib

    module_name, func_name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"Cannot import module {module_name!r} for reward {spec!r}: {exc}") from exc
    if not hasattr(module, func_name):
        raise ValueError(f"Module {module_name!r} has no function {func_name!r} (reward {spec!r}).")
    return getattr(module, func_name)


def _name(f) -> str:
    return getattr(f, "__name__", None) or type(f).__name__


def _call_error(f, exc: Exception, columns: dict) -> str:
    """What a reward function's exception means for the user, with the fix."""
    name, text = _name(f), str(exc)
    unexpected = re.search(r"unexpected keyword argument '([^']+)'", text)
    if isinstance(exc, TypeError) and unexpected:
        return (
            f"Reward function {name!r} does not accept the query column {unexpected.group(1)!r}: rewards are called "
            f"as f(prompts=..., completions=..., **columns) with every other column of the query dataset "
            f"({sorted(columns)}). Add **kwargs to its signature: def {name}(prompts, completions, **kwargs)."
        )
    if isinstance(exc, TypeError) and ("positional argument" in text or "keyword argument" in text):
        return (
            f"Reward function {name!r} has a signature DRIFT cannot call ({text}). Rewards follow TRL's convention: "
            f"def {name}(prompts, completions, **kwargs) -> list[float], the query dataset's other columns "
            f"({sorted(columns)}) arriving by name in kwargs."
        )
    key = exc.args[0] if isinstance(exc, KeyError) and exc.args else None
    if isinstance(key, str) and key not in columns:
        return (
            f"Reward function {name!r} raised KeyError {key!r}: if it reads a column {key!r}, the query dataset does "
            f"not have one (columns besides `prompt`: {sorted(columns)}). Add that column to the query dataset, or "
            "read one it has."
        )
    return f"Reward function {name!r} raised {type(exc).__name__}: {text}"


def call_reward(f: RewardFunc, prompts: list, completions: list, columns: dict[str, list]) -> list[float]:
    """One reward function's values (``None`` -> 0.0), checked: raises ``RuntimeError`` naming the function and the
    fix if it raises, returns the wrong number of values, or returns NaN."""
    try:
        values = f(prompts=prompts, completions=completions, **columns)
    except Exception as exc:  # re-raised with the function's name and the fix
        raise RuntimeError(_call_error(f, exc, columns)) from exc
    values = list(values) if values is not None and not isinstance(values, (str, bytes)) else None
    if values is None or len(values) != len(completions):
        got = "None" if values is None else f"{len(values)} values"
        raise RuntimeError(
            f"Reward function {_name(f)!r} returned {got} for {len(completions)} completions; it must return a list "
            "with one float per completion."
        )
    out = []
    for i, v in enumerate(values):
        try:
            v = 0.0 if v is None else float(v)
        except (TypeError, ValueError) as exc:
            raise RuntimeError(
                f"Reward function {_name(f)!r} returned {v!r} for completion {i}, which is not a number; it must "
                "return one float (or None) per completion."
            ) from exc
        if math.isnan(v):
            raise RuntimeError(
                f"Reward function {_name(f)!r} returned NaN for completion {i} ({completion_text(completions[i])!r})."
            )
        out.append(v)
    return out


def compute_rewards(
    reward_funcs: Sequence[RewardFunc], prompts: list, completions: list, columns: dict[str, list]
) -> list[float]:
    """Sum the rewards of every function for each completion, each checked by :func:`call_reward`.

    ``None`` (TRL's "not applicable") counts as 0.
    """
    total = [0.0] * len(completions)
    for f in reward_funcs:
        for i, v in enumerate(call_reward(f, prompts, completions, columns)):
            total[i] += v
    return total


PLACEHOLDER_COMPLETION = ""


def check_reward_funcs(reward_funcs: Sequence[RewardFunc], query_dataset) -> None:
    """Call every reward function once, before training, on the first query row with a placeholder (empty)
    completion in the query's format and all of the row's columns, so a wrong signature, a missing column, a wrong
    number of values or a NaN fails now rather than at the first refresh. Raises ``RuntimeError`` naming the
    function, the column and the fix."""
    from drift_trainer.core.rollouts import is_conversational_prompt

    row = query_dataset[0]
    prompt = row["prompt"]
    completion = (
        [{"role": "assistant", "content": PLACEHOLDER_COMPLETION}]
        if is_conversational_prompt(prompt)
        else PLACEHOLDER_COMPLETION
    )
    columns = {c: [row[c]] for c in query_dataset.column_names if c != "prompt"}
    for f in reward_funcs:
        try:
            call_reward(f, [prompt], [completion], columns)
        except RuntimeError as exc:
            raise RuntimeError(
                f"{exc} (found before training: each reward function is called once on the first query row, "
                f"with a placeholder completion)"
            ) from exc.__cause__

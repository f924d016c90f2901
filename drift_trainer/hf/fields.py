"""Helpers of the option dataclasses: help metadata and validation that names the field and the allowed values."""

from __future__ import annotations


def _help(text: str, choices: tuple[str, ...] | None = None) -> dict:
    meta = {"help": text}
    if choices:
        meta["choices"] = list(choices)
    return meta


def _choice(obj, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}.")


def _range(obj, name, low, high, low_open=False, high_open=False) -> None:
    value = getattr(obj, name)
    ok = (value > low if low_open else value >= low) if low is not None else True
    if high is not None:
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        lo = ("(" if low_open else "[") + str(low)
        hi = (str(high) + (")" if high_open else "]")) if high is not None else "inf)"
        raise ValueError(f"{name} must be in {lo}, {hi}; got {value!r}.")

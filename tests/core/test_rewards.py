import math

import pytest

from drift_trainer.core.rewards import (
    compute_rewards,
    exact_match,
    extract_final_answer,
    load_reward,
    math_answer,
    resolve_reward_funcs,
)


def test_exact_match_text_and_conversational():
    assert exact_match(["q", "q"], ["46", " 47 "], answer=["46", "47"]) == [1.0, 1.0]
    conv = [[{"role": "assistant", "content": "12"}], [{"role": "assistant", "content": "13"}]]
    assert exact_match(["q", "q"], conv, answer=["12", "12"]) == [1.0, 0.0]
    with pytest.raises(ValueError, match="answer"):
        exact_match(["q"], ["1"])


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so the result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("work... #### 1,000", "1,000"),
        ("first 3 then 42", "42"),
        ("no digits", None),
    ],
)
def test_extract_final_answer(text, expected):
    assert extract_final_answer(text) == expected


def test_math_answer_compares_values():
    completions = ["\\boxed{1000}", "#### 1,000.0", "answer 0.5", "\\boxed{x+1}", "nothing"]
    refs = ["1000", "1000", "1/2", "x+1", "3"]
    assert math_answer([""] * 5, completions, answer=refs) == [1.0, 1.0, 1.0, 1.0, 0.0]
    # the reference may be a full worked solution
    assert math_answer([""], ["#### 7"], solution=["3 + 4 = 7\n#### 7"]) == [1.0]


def test_compute_rewards_sums_and_names_bad_functions():
    def one(prompts, completions, **kw):
        return [1.0] * len(completions)

    assert compute_rewards([one, one], ["p", "p"], ["a", "b"], {}) == [2.0, 2.0]

    def boom(prompts, completions, **kw):
        raise KeyError("oops")

    def short(prompts, completions, **kw):
        return [1.0]

    def nan(prompts, completions, **kw):
        return [math.nan] * len(completions)

    with pytest.raises(RuntimeError, match="'boom' raised KeyError"):
        compute_rewards([boom], ["p"], ["a"], {})
    with pytest.raises(RuntimeError, match="'short' returned 1 values for 2"):
        compute_rewards([short], ["p", "p"], ["a", "b"], {})
    with pytest.raises(RuntimeError, match="'nan' returned NaN"):
        compute_rewards([nan], ["p"], ["a"], {})


def test_resolve_and_load():
    assert resolve_reward_funcs("exact_match") == [exact_match]
    assert resolve_reward_funcs([exact_match, "math_answer"]) == [exact_match, math_answer]
    assert load_reward("drift_trainer.core.rewards:exact_match") is exact_match
    with pytest.raises(ValueError, match="Unknown reward"):
        load_reward("nope")
    with pytest.raises(ValueError, match="Cannot import"):
        load_reward("no_such_module_x:f")
    with pytest.raises(TypeError, match="callables"):
        resolve_reward_funcs([3])

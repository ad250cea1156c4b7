"""The GRPO baseline's reward (rewards.py): final answers of MATH and GSM8K solutions and model
completions, compared after normalising simple forms; wrong or missing answers score 0."""

from __future__ import annotations

import inspect

import pytest

from tms_axolotl_plugin.rewards import (
    answers_match,
    extract_answer,
    last_boxed,
    math_answer_reward,
    normalize_answer,
    reference_answer,
    score_answer,
)

# Real MATH training solutions (problem statements left out).
MATH_SOLUTION = (
    "For the piecewise function to be continuous, the cases must \"meet\" at $2$ and $-2$. For "
    "example, $ax+3$ and $x-5$ must be equal when $x=2$. This implies $a(2)+3=2-5$, which we "
    "solve to get $2a=-6 \\Rightarrow a=-3$. Similarly, $x-5$ and $2x-b$ must be equal when "
    "$x=-2$. Substituting, we get $-2-5=2(-2)-b$, which implies $b=3$. So $a+b=-3+3=\\boxed{0}$."
)
MATH_FRACTION_SOLUTION = (
    "There are $\\binom{6}{2} = 15$ ways to choose the two balls, and $\\binom{3}{2} = 3$ of "
    "them are both white. So the probability is $\\frac{3}{15} = \\boxed{\\dfrac{1}{5}}$."
)
MATH_NESTED_SOLUTION = (
    "Rationalizing the denominator, $\\frac{1}{\\sqrt{2}-1} = \\frac{\\sqrt{2}+1}{(\\sqrt{2}-1)"
    "(\\sqrt{2}+1)} = \\boxed{\\sqrt{2}+1}$. Equivalently the answer is "
    "$\\boxed{\\frac{\\sqrt{2}+1}{1}}$."
)
# A real GSM8K training solution.
GSM8K_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


def test_last_boxed_takes_the_last_box_and_keeps_nested_braces():
    assert last_boxed(MATH_SOLUTION) == "0"
    assert last_boxed(MATH_FRACTION_SOLUTION) == "\\dfrac{1}{5}"
    assert last_boxed(MATH_NESTED_SOLUTION) == "\\frac{\\sqrt{2}+1}{1}"
    assert last_boxed("so $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$") == \
        "\\left( 3, \\frac{\\pi}{2} \\right)"


def test_last_boxed_forms_without_braces_fbox_and_broken_boxes():
    assert last_boxed("The answer is $\\boxed 5$.") == "5"
    assert last_boxed("\\fbox{12}") == "12"
    assert last_boxed("no box here") is None
    assert last_boxed("\\boxed{\\frac{1}{2}") is None  # unbalanced: no answer


def test_extract_answer_boxed_then_gsm8k_marker_then_last_number():
    assert extract_answer(MATH_SOLUTION) == "0"
    assert extract_answer(GSM8K_SOLUTION) == "72"
    assert extract_answer("She pays 3 * 4 = 12 dollars, so the total is $1,250.") == "1,250"
    assert extract_answer("#### 1,080") == "1,080"
    assert extract_answer("I am not sure.") is None


@pytest.mark.parametrize("written, canonical", [
    ("1,000", "1000"),
    ("\\$1,000", "1000"),
    ("18.0", "18"),
    ("18.00", "18"),
    ("0.50", "0.5"),
    (".5", "0.5"),
    ("\\frac{1}{2}", "1/2"),
    ("\\dfrac{1}{2}", "1/2"),
    ("\\tfrac12", "1/2"),
    ("-\\frac{3}{4}", "-3/4"),
    ("\\frac{\\sqrt{3}}{2}", "(\\sqrt{3})/2"),
    ("\\frac{\\sqrt3}2", "(\\sqrt{3})/2"),
    (" 5 ", "5"),
    ("x = 5", "5"),
    ("90^\\circ", "90"),
    ("25\\%", "25"),
    ("12 \\text{ inches}", "12"),
    ("\\text{(C)}", "(C)"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\pi/2)"),
])
def test_normalize_answer_simple_forms(written, canonical):
    assert normalize_answer(written) == canonical


@pytest.mark.parametrize("predicted, reference", [
    ("1/2", "\\frac{1}{2}"),
    ("0.5", "\\frac12"),
    ("\\dfrac{2}{4}", "\\frac{1}{2}"),
    ("1000", "1,000"),
    ("72.0", "72"),
    ("$72$", "72"),
    ("\\sqrt{2}+1", "\\sqrt2 + 1"),
])
def test_equal_answers_in_different_forms_match(predicted, reference):
    assert answers_match(predicted, reference)


@pytest.mark.parametrize("predicted, reference", [
    ("71", "72"),
    ("\\frac{1}{3}", "\\frac{1}{2}"),
    ("0.33", "\\frac13"),
    ("-5", "5"),
    ("(1,2)", "(2,1)"),
    ("", "0"),
])
def test_different_answers_do_not_match(predicted, reference):
    assert not answers_match(predicted, reference)


def test_reference_may_be_a_bare_answer_or_a_whole_solution():
    assert reference_answer("\\frac{1}{5}") == "\\frac{1}{5}"
    assert reference_answer(MATH_FRACTION_SOLUTION) == "\\dfrac{1}{5}"
    assert reference_answer(GSM8K_SOLUTION) == "72"


def test_reference_solutions_score_one_against_their_own_answers():
    assert score_answer(MATH_SOLUTION, "0") == 1.0
    assert score_answer(MATH_FRACTION_SOLUTION, "\\frac{1}{5}") == 1.0
    assert score_answer(GSM8K_SOLUTION, "72") == 1.0
    assert score_answer(GSM8K_SOLUTION, GSM8K_SOLUTION) == 1.0


def test_model_style_completions_are_scored():
    right = ("Each box holds 12 pencils, and there are 6 boxes, so there are $12 \\times 6 = 72$ "
             "pencils.\n\nThe final answer is $\\boxed{72}$.")
    wrong = "Each box holds 12 pencils, so 12 + 6 = 18 pencils.\n\nThe answer is $\\boxed{18}$."
    unboxed_right = "48 / 2 = 24 in May, and 48 + 24 = 72 in total."
    no_answer = "Let me think about this problem step by step."
    assert score_answer(right, "72") == 1.0
    assert score_answer(wrong, "72") == 0.0
    assert score_answer(unboxed_right, "72") == 1.0  # GSM8K: the last number
    assert score_answer(no_answer, "72") == 0.0
    assert score_answer(right, None) == 0.0


def test_a_later_wrong_box_overrides_an_earlier_right_one():
    text = "At first I get $\\boxed{\\frac{1}{5}}$, but correcting: $\\boxed{\\frac{2}{5}}$."
    assert score_answer(text, "\\frac{1}{5}") == 0.0
    assert score_answer(text, "\\frac{2}{5}") == 1.0


def test_reward_takes_trl_keyword_arguments_and_chat_completions():
    """TRL calls reward(prompts=..., completions=..., completion_ids=..., <columns>, ...)."""
    prompts = [[{"role": "user", "content": "Natalia sold clips ..."}]] * 3
    completions = [
        [{"role": "assistant", "content": "48 + 24 = 72, so $\\boxed{72}$."}],
        [{"role": "assistant", "content": "She sold $\\boxed{70}$ clips."}],
        [{"role": "assistant", "content": [{"type": "text", "text": "#### 72"}]}],
    ]
    rewards = math_answer_reward(prompts=prompts, completions=completions,
                                 completion_ids=[[1], [2], [3]], answer=["72"] * 3,
                                 trainer_state=None, log_extra=None, log_metric=None)
    assert rewards == [1.0, 0.0, 1.0]


def test_reward_on_plain_text_completions():
    rewards = math_answer_reward(["\\boxed{\\frac{1}{2}}", "\\boxed{0.5}", "\\boxed{2}", ""],
                                 ["\\frac{1}{2}"] * 4)
    assert rewards == [1.0, 1.0, 0.0, 0.0]


def test_reward_has_the_arity_axolotl_checks():
    # Axolotl's GRPOStrategy.get_reward_func rejects functions with fewer than 2 parameters.
    assert len(inspect.signature(math_answer_reward).parameters) >= 2

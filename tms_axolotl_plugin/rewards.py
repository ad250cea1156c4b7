"""Math-answer checking: the reward of the GRPO baseline (`example_configs/grpo_math.yml`).

TMS itself is reward-free; this module exists only so the GRPO baseline of the paper can run
through Axolotl's own `rl: grpo` path:

    trl:
      reward_funcs: [tms_axolotl_plugin.rewards.math_answer_reward]

TRL's GRPOTrainer calls every reward function with keyword arguments: `prompts`,
`completions` (strings, or for chat datasets one `[{"role": "assistant", "content": ...}]`
list per completion), `completion_ids`, every other dataset column as a list (here `answer`,
written by `tms_axolotl_plugin.prepare_data`) and a few trainer objects; it expects one float
per completion.

The final answer of a text is its last `\\boxed{...}` (nested braces allowed), else the number
after the last `####` (GSM8K), else its last number. Answers are compared after normalising
simple surface forms: `1,000` = `1000`, `\\frac{1}{2}` = `\\dfrac12` = `1/2` = `0.5`,
`18.0` = `18`, and `$`, `\\text{...}`, a unit after a number, `^\\circ`, `\\%`, spaces and a
leading `x =` are dropped. Anything subtler (equivalent algebraic expressions, intervals in
another order) counts as wrong: the reward is strict rather than generous.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

BOX_COMMANDS = ("\\boxed", "\\fbox")
# A number as written in solutions: optional sign, thousands separators, decimals.
_NUMBER = re.compile(r"(?<![\w.])[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])[-+]?\.\d+")
_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox|mathbf)\s*\{([^{}]*)\}")
_SPACING = re.compile(r"\\[,;:! ]|\\q?quad")
_FRAC_SHORT = re.compile(r"\\frac(\d)(\d)")  # \frac12
_FRAC_ONE_BRACED = re.compile(r"\\frac(\d)\{")  # \frac1{2}
_SQRT_SHORT = re.compile(r"\\sqrt(\w)")  # \sqrt2
_THOUSANDS = re.compile(r"(?<![\d.])(\d{1,3}(?:,\d{3})+)(?![\d,])")
_DECIMAL = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")
_LEADING_VARIABLE = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?=(?!=)")
_TRAILING_UNIT = re.compile(r"^(.*\d)\s*\\(?:text|mbox|mathrm)\s*\{\s*[a-zA-Z][a-zA-Z. ]*\}$")  # 5 \text{ cm}


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The contents of the `{...}` group opening at `text[start]`, and the index after it."""
    if start >= len(text) or text[start] != "{":
        return None
    depth = 0
    for index in range(start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : index], index + 1
    return None  # unbalanced: no answer


def last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` (or `\\fbox{...}`, `\\boxed 5`) in `text`."""
    position = max(text.rfind(command) for command in BOX_COMMANDS)
    if position < 0:
        return None
    command = next(c for c in BOX_COMMANDS if text.startswith(c, position))
    rest = position + len(command)
    if text.startswith(" ", rest) and not text[rest:].lstrip().startswith("{"):
        match = re.match(r"\s+([^\s$]+)", text[rest:])  # "\boxed 5$"
        return match.group(1) if match else None
    while rest < len(text) and text[rest].isspace():
        rest += 1
    group = _braced(text, rest)
    return group[0] if group else None


def extract_answer(text: str) -> str | None:
    """The final answer of a solution or completion, unnormalised; None when there is none."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    if "####" in text:
        tail = text.rsplit("####", 1)[1]
        match = _NUMBER.search(tail)
        if match:
            return match.group()
        line = tail.strip().splitlines()[0].strip() if tail.strip() else ""
        return line or None
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _simplify_fracs(text: str) -> str:
    """`\\frac{a}{b}` -> `a/b` (parenthesised when a or b is not a single term)."""
    text = _FRAC_SHORT.sub(r"\\frac{\1}{\2}", text)
    text = _FRAC_ONE_BRACED.sub(r"\\frac{\1}{", text)
    while (start := text.find("\\frac{")) >= 0:
        numerator = _braced(text, start + len("\\frac"))
        if numerator is None:
            break
        denominator = _braced(text, numerator[1])
        if denominator is None and numerator[1] < len(text) and text[numerator[1]].isalnum():
            denominator = (text[numerator[1]], numerator[1] + 1)  # \frac{\sqrt{3}}2
        if denominator is None:
            break
        parts = [p if re.fullmatch(r"-?\\?[\w.]+", p) else f"({p})"
                 for p in (numerator[0], denominator[0])]
        text = text[:start] + f"{parts[0]}/{parts[1]}" + text[denominator[1]:]
    return text


def _canonical_number(text: str) -> str:
    number = text.lstrip("+")
    if "." in number:
        number = number.rstrip("0").rstrip(".")  # "18.00" -> "18", "0.50" -> "0.5"
        if number.startswith("."):
            number = "0" + number
        elif number.startswith("-."):
            number = "-0" + number[1:]
    return "0" if number in ("-0", "", "-") else number


def normalize_answer(answer: str) -> str:
    """A canonical string for simple answer forms (see the module docstring)."""
    text = answer.strip()
    text = text.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    text = text.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    text = _SPACING.sub("", text)
    text = _TRAILING_UNIT.sub(r"\1", text)
    while _TEXT_WRAPPERS.search(text):
        text = _TEXT_WRAPPERS.sub(r"\1", text)
    for unit in ("^\\circ", "^{\\circ}", "\\circ", "\\%", "%", "\\$", "$"):
        text = text.replace(unit, "")
    text = _SQRT_SHORT.sub(r"\\sqrt{\1}", text)
    text = _simplify_fracs(text)
    text = _THOUSANDS.sub(lambda m: m.group(1).replace(",", ""), text)
    text = re.sub(r"\s+", "", text).rstrip(".")
    text = _LEADING_VARIABLE.sub("", text)
    if _DECIMAL.fullmatch(text):
        text = _canonical_number(text)
    return text


def _as_fraction(text: str) -> Fraction | None:
    """`text` as an exact rational number ("3", "-0.25", "1/2", "(3)/(4)"), else None."""
    plain = text.replace("(", "").replace(")", "")
    if not re.fullmatch(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:/[-+]?(?:\d+\.?\d*|\.\d+))?", plain):
        return None
    try:
        return Fraction(plain)
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(predicted: str, reference: str) -> bool:
    """True when two final answers are the same after normalisation (or the same number)."""
    a, b = normalize_answer(predicted), normalize_answer(reference)
    if not a or not b:
        return False
    if a == b:
        return True
    x, y = _as_fraction(a), _as_fraction(b)
    return x is not None and x == y


def reference_answer(reference: str) -> str:
    """The final answer of a reference: extracted when it is a whole solution, else as is."""
    if last_boxed(reference) is not None or "####" in reference:
        return extract_answer(reference) or reference
    return reference


def completion_text(completion: Any) -> str:
    """The generated text of a completion: a string, or a list of chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    parts = []
    for message in completion or []:
        content = message.get("content") if isinstance(message, dict) else message
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        parts.append(str(content or ""))
    return "\n".join(parts)


def score_answer(completion: Any, reference: str) -> float:
    """1.0 when the completion's final answer equals the reference's, else 0.0."""
    if reference is None:
        return 0.0
    predicted = extract_answer(completion_text(completion))
    if predicted is None:
        return 0.0
    return 1.0 if answers_match(predicted, reference_answer(str(reference))) else 0.0


def math_answer_reward(completions: list[Any], answer: list[str], **kwargs: Any) -> list[float]:
    """GRPO reward: 1.0 per completion whose final answer matches the `answer` column, else 0.0.

    `answer` may hold bare final answers (as `prepare_data` writes them) or whole reference
    solutions (MATH's `\\boxed{}` or GSM8K's `#### n`). Other keyword arguments are ignored.
    """
    return [score_answer(c, r) for c, r in zip(completions, answer, strict=True)]

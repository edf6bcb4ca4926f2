r"""Final-answer extraction from a model's response (untrusted text; nothing is evaluated).

    extract_answer("... last line\nAnswer: 3/4")           -> "3/4"           (DAPO style)
    extract_answer(r"so \boxed{\frac{1}{2}} it is")     -> r"\frac{1}{2}"   (last \boxed{})

    extract_answer("7 x 8 = 56, so 56 apples.", last_number=True) -> "56"

The DAPO form ("Answer: X" on the last line that has one) wins over \boxed{}; surrounding
$...$ are removed. With last_number (lm-evaluation-harness's "flexible extract"), a response
with neither gives its last number (optional sign, thousands commas dropped, decimals). Braces
are matched by counting, so deep nesting costs one pass and no stack.
Responses longer than MAX_CHARS are read only at their end (the answer is at the end).
"""

from __future__ import annotations

import re

MAX_CHARS = 20_000  # characters read from the end of a response
# blanks, not \s: \s would also take newlines, and a search from every line start over all the
# newlines after it is quadratic (20,000 empty lines: seconds)
ANSWER_LINE = re.compile(
    r"^[ \t]*\**answer\**[ \t]*[:：][ \t]*(.+?)[ \t\r]*$", re.IGNORECASE | re.MULTILINE
)
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def extract_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} or \\fbox{...} with balanced braces, or None."""
    for command in ("\\boxed", "\\fbox"):
        start = text.rfind(command + "{")
        if start < 0:
            start = text.rfind(command + " {")
        if start < 0:
            continue
        open_at = text.index("{", start)
        depth = 0
        for i in range(open_at, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[open_at + 1 : i].strip()
        return None  # unbalanced: no answer
    return None


def extract_answer_line(text: str) -> str | None:
    matches = ANSWER_LINE.findall(text)
    if not matches:
        return None
    answer = matches[-1].strip()
    boxed = extract_boxed(answer)
    if boxed is not None:
        return boxed
    if len(answer) >= 2 and answer[0] == "$" and answer[-1] == "$":
        answer = answer.strip("$").strip()
    return answer.rstrip(".").strip() or None


def extract_last_number(text: str) -> str | None:
    numbers = NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def extract_answer(text: str, last_number: bool = False) -> str | None:
    text = text[-MAX_CHARS:]
    answer = extract_answer_line(text)
    if answer is None:
        answer = extract_boxed(text)
    if answer is None and last_number:
        answer = extract_last_number(text)
    return answer

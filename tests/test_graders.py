"""Graders against a table of expected verdicts, and adversarial outputs in the sandbox."""

import os
import time

import psutil
import pytest

from megatron_rpg.rewards.extract import extract_answer
from megatron_rpg.rewards.sandbox import GraderPool

# (response, reference, expected reward)
MATH_CASES = [
    # equivalent fractions and decimals
    ("Answer: 1/2", r"\frac{1}{2}", 1),
    ("Answer: 0.5", r"\frac{1}{2}", 1),
    (r"so \boxed{\frac{2}{4}}", r"\frac{1}{2}", 1),
    (r"Answer: \dfrac{3}{4}", r"\frac{3}{4}", 1),
    ("Answer: 0.75", r"\frac34", 1),
    (r"\boxed{\tfrac{5}{10}}", "0.5", 1),
    ("Answer: 2/3", r"\frac{2}{3}", 1),
    ("Answer: 0.67", r"\frac{2}{3}", 0),
    ("Answer: 1/3", r"\frac{1}{2}", 0),
    (r"\boxed{-\frac{7}{2}}", "-3.5", 1),
    # integers, signs, thousands separators
    ("Answer: 42", "42", 1),
    ("Answer: 042", "42", 1),
    ("Answer: 41", "42", 0),
    ("Answer: -5", "-5", 1),
    ("Answer: 5", "-5", 0),
    ("Answer: 1,000", "1000", 1),
    (r"\boxed{1000}", "1000", 1),
    ("Answer: 10^3", "1000", 1),
    ("Answer: 2^{10}", "1024", 1),
    ("Answer: 1e3", "1000", 0),  # math-verify reads e as Euler's number: 1*e^3, not 1000
    # radicals, pi, symbolic
    (r"Answer: \sqrt{8}", r"2\sqrt{2}", 1),
    (r"\boxed{2\sqrt2}", r"2\sqrt{2}", 1),
    (r"Answer: \frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}", 1),
    (r"\boxed{\sqrt{3}}", r"\sqrt{2}", 0),
    (r"Answer: 2\pi", r"2\pi", 1),
    (r"Answer: \pi \cdot 2", r"2\pi", 1),
    (r"\boxed{6.28}", r"2\pi", 0),
    (r"Answer: x^2+2x+1", "(x+1)^2", 1),
    (r"Answer: x^2+1", "(x+1)^2", 0),
    (r"\boxed{\frac{x}{2}}", "x/2", 1),
    # LaTeX forms and wrappers
    (r"Answer: $\frac{1}{2}$", "1/2", 1),
    (r"Answer: $$12$$", "12", 1),
    (r"so \boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)", 1),
    (r"\boxed{\text{(C)}}", r"\text{(C)}", 1),
    (r"\boxed{(C)}", r"\text{(C)}", 1),
    (r"**Answer:** 7", "7", 1),
    ("answer: 7", "7", 1),
    ("Answer: 7.", "7", 1),
    # units and degrees
    (r"Answer: 30^\circ", "30", 1),
    (r"\boxed{30^{\circ}}", r"30^\circ", 1),
    (r"Answer: 5 \text{ cm}", "5", 1),
    (r"\boxed{12\text{ dollars}}", "12", 1),
    (r"Answer: 50\%", "50", 1),
    # intervals and sets
    (r"Answer: (1, 2]", "(1,2]", 1),
    (r"\boxed{[0, \infty)}", r"[0,\infty)", 1),
    (r"Answer: (1, 2)", "(1,2]", 0),
    (r"\boxed{\{1, 2, 3\}}", r"\{3,2,1\}", 1),
    (r"Answer: 1, 2, 3", r"1,2,3", 1),
    (r"\boxed{(-\infty, -1) \cup (1, \infty)}", r"(-\infty,-1)\cup(1,\infty)", 1),
    (r"Answer: x \in [2, 5]", "[2,5]", 1),
    # equations and variables
    (r"Answer: x = 3", "3", 1),
    (r"\boxed{y=2x+1}", "y=2x+1", 1),
    (r"Answer: k=4", "5", 0),
    # no answer, wrong place, malformed
    ("I think it is 42", "42", 0),
    ("", "42", 0),
    (r"\boxed{", "42", 0),
    (r"\boxed{4}2", "42", 0),
    ("Answer:", "42", 0),
    ("Answer: forty-two", "42", 0),
    # the last answer counts
    ("Answer: 41\nwait, no\nAnswer: 42", "42", 1),
    (r"\boxed{41} hmm \boxed{42}", "42", 1),
    ("Answer: 42\n" + r"\boxed{41}", "42", 1),
    # GSM8K style
    ("She pays 18 dollars.\nAnswer: 18", "18", 1),
    ("Answer: $18", "18", 1),
    ("Answer: 18.00", "18", 1),
]


@pytest.fixture(scope="module")
def pool():
    with GraderPool(workers=2, timeout_s=5.0, memory_mb=512) as pool:
        yield pool


def test_table_of_math_verdicts(pool):
    assert len(MATH_CASES) >= 60
    scores, stats = pool.grade("math", [(r, a) for r, a, _ in MATH_CASES])
    wrong = [(r, a, e, s) for (r, a, e), s in zip(MATH_CASES, scores, strict=True) if s != e]
    assert not wrong, wrong
    assert stats["timeouts"] == stats["crashes"] == 0


def test_extraction_prefers_the_answer_line_and_matches_braces():
    assert extract_answer(r"x \boxed{1}" + "\nAnswer: 2") == "2"
    assert extract_answer(r"\boxed{\frac{\sqrt{a}}{b^{2}}}") == r"\frac{\sqrt{a}}{b^{2}}"
    assert extract_answer(r"\boxed{" + "{" * 5000 + "}" * 5000 + "}") == "{" * 5000 + "}" * 5000
    assert extract_answer("no answer here") is None


# (response, reference, strict verdict, last-number verdict)
LAST_NUMBER_CASES = [
    ("7 x 8 = 56", "56", 0, 1),
    ("7 x 8 = 56.", "56", 0, 1),
    ("The boxes hold 1,200 apples in all", "1200", 0, 1),
    ("-3 degrees, then 4 degrees", "4", 0, 1),
    ("It is 2.50 dollars", "2.5", 0, 1),
    ("56 at first, but then 57", "56", 0, 0),  # the last number, not any number
    ("Answer: 12\nso 13 more", "12", 1, 1),  # a stated answer wins over the last number
    (r"\boxed{9} and 10", "9", 1, 1),
    ("no number here", "5", 0, 0),
]


def test_last_number_extraction_reads_responses_that_state_no_answer(pool):
    items = [(r, a) for r, a, _, _ in LAST_NUMBER_CASES]
    strict, _ = pool.grade("math", items)
    last_number, _ = pool.grade("math_last_number", items)
    assert strict == [float(c[2]) for c in LAST_NUMBER_CASES]
    assert last_number == [float(c[3]) for c in LAST_NUMBER_CASES]
    assert extract_answer("x 3 y 1,024", last_number=True) == "1024"
    assert extract_answer("Answer: 7\n8", last_number=True) == "7"


def test_extraction_is_linear_in_blank_lines():
    start = time.perf_counter()
    assert extract_answer("\n" * 19_000 + "Answer: 5\n" + "\n \n" * 300) == "5"
    assert extract_answer("\n" * 20_000) is None
    assert time.perf_counter() - start < 0.5  # quadratic: seconds


def test_a_worker_dead_before_its_item_scores_zero_and_is_replaced():
    with GraderPool(workers=1, timeout_s=5.0) as pool:
        pool.workers[0].process.kill()
        pool.workers[0].process.join()
        scores, stats = pool.grade("exact", [("1", "1"), ("2", "2")])
        assert scores == [0.0, 1.0] and stats["crashes"] == 1


def test_exact_grader_in_the_sandbox(pool):
    scores, _ = pool.grade("exact", [("12", "12"), (" 12 ", "12"), ("1 2", "12")])
    assert scores == [1.0, 1.0, 0.0]


ADVERSARIAL = [
    r"Answer: \boxed{" + "{" * 200_000 + "1" + "}" * 200_000 + "}",  # deep nesting
    "Answer: " + "9" * 10_000_000,  # 10 MB
    "Answer: __import__('os').system('touch /tmp/pwned_by_grader')",  # would run if evaluated
    "Answer: " + "(" * 50_000 + "1" + ")" * 50_000,
    r"Answer: 10^{10^{10^{10^{10}}}}",  # symbolic blow-up
    r"Answer: 9^{9^{9^{9}}}!",
    "Answer: " + "x+" * 300_000 + "1",
]


@pytest.mark.slow
def test_adversarial_outputs_score_zero_in_time_and_leave_no_process(tmp_path):
    marker = "/tmp/pwned_by_grader"
    if os.path.exists(marker):
        os.remove(marker)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    start = time.monotonic()
    with GraderPool(workers=2, timeout_s=3.0, memory_mb=512) as pool:
        scores, stats = pool.grade("math", [(text, "42") for text in ADVERSARIAL])
        assert scores == [0.0] * len(ADVERSARIAL)
        # the pool still works after timeouts and crashes
        again, _ = pool.grade("math", [("Answer: 42", "42")])
        assert again == [1.0]
    elapsed = time.monotonic() - start
    assert elapsed < 3.0 * len(ADVERSARIAL) + 30  # every item bounded by its timeout
    assert not os.path.exists(marker)
    time.sleep(0.5)
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before, f"left behind: {after - before}"
    print(stats)

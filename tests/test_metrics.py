"""Hand-computed cases for train.metrics (ANLS, exact match, CER)."""

import math

import numpy as np
import pytest

from train.metrics import (
    anls,
    best_constant_answer,
    character_error_rate,
    exact_match,
    mean_anls,
    normalize_answer,
)


def test_exact_answer_scores_one():
    assert anls("Paris", ["Paris"]) == 1.0


def test_near_answer_gets_partial_credit():
    # "1,234" -> "1,235": one substitution over 5 characters.
    assert anls("1,234", ["1,235"]) == pytest.approx(0.8)
    # "colour" vs "color": one deletion over max length 6.
    assert anls("color", ["colour"]) == pytest.approx(1 - 1 / 6)


def test_beyond_threshold_scores_zero():
    assert anls("cat", ["dog"]) == 0.0
    # 3 edits over 5 characters: similarity 0.4 < 0.5.
    assert anls("abcde", ["abxyz"]) == 0.0
    # Exactly at the threshold (2 edits / 4 chars = 0.5) is kept.
    assert anls("abcd", ["abxy"]) == pytest.approx(0.5)
    # A stricter threshold removes it.
    assert anls("abcd", ["abxy"], threshold=0.6) == 0.0


def test_best_of_several_references():
    assert anls("color", ["blue", "colour", "red"]) == pytest.approx(1 - 1 / 6)
    assert anls("red", ["blue", "colour", "red"]) == 1.0
    assert anls("green", ["blue", "colour", "red"]) == 0.0


def test_case_and_whitespace_are_ignored():
    assert anls("HELLO", ["hello"]) == 1.0
    assert anls("  new \t  york\n", ["New York"]) == 1.0
    assert normalize_answer("  A \n B  ") == "a b"
    # Inner whitespace is collapsed, not removed: "newyork" is one deletion away from "new york".
    assert anls("newyork", ["new york"]) == pytest.approx(1 - 1 / 8)


def test_empty_strings_and_empty_references():
    assert anls("", [""]) == 1.0
    assert anls("   ", [""]) == 1.0
    assert anls("", ["abc"]) == 0.0
    assert anls("abc", [""]) == 0.0
    assert anls("anything", []) == 0.0
    with pytest.raises(TypeError):
        anls("a", "a")


def test_mean_anls():
    preds = ["paris", "1,234", "cat"]
    refs = [["Paris"], ["1,235"], ["dog"]]
    assert mean_anls(preds, refs) == pytest.approx((1.0 + 0.8 + 0.0) / 3)
    assert mean_anls([], []) == 0.0
    with pytest.raises(ValueError):
        mean_anls(["a"], [])


def test_exact_match():
    assert exact_match(" Red ", ["blue", "red"]) == 1.0
    assert exact_match("reds", ["red"]) == 0.0
    assert exact_match("x", []) == 0.0


def test_character_error_rate():
    # kitten -> sitting: 2 substitutions + 1 insertion over 7 reference characters.
    assert character_error_rate("kitten", "sitting") == pytest.approx(3 / 7)
    assert character_error_rate("abc", "abc") == 0.0
    # Case matters for CER.
    assert character_error_rate("ABC", "abc") == 1.0
    # Longer than the reference: can exceed 1.
    assert character_error_rate("abcdef", "ab") == 2.0
    assert character_error_rate("", "") == 0.0
    assert character_error_rate("ab", "") == 2.0
    assert math.isclose(character_error_rate("", "abcd"), 1.0)


def test_best_constant_answer():
    # Disjoint single characters: nothing beats guessing one of them.
    assert best_constant_answer(["1", "2", "3", "4"]) == (0.25, "1")
    # A made-up compromise scores on several short overlapping words at once, beating any real answer (0.25).
    score, best = best_constant_answer(["red", "green", "blue", "yellow"])
    assert score >= 0.35 and best not in {"red", "green", "blue", "yellow"}
    assert np.mean([anls(best, [v]) for v in ["red", "green", "blue", "yellow"]]) == pytest.approx(score)

"""Strict readers of model_args values: booleans and whole numbers, as lmms-eval's parser hands them over."""

from __future__ import annotations

import pytest
from lmms_eval.utils import simple_parse_args_string

from lmms_eval_redundancy.core.errors import UserError
from lmms_eval_redundancy.core.values import positive_int, strict_bool, whole_number

SPELLINGS = {"true": True, "True": True, "TRUE": True, "yes": True, "Yes": True, "1": True,
             "false": False, "False": False, "no": False, "NO": False, "0": False}


@pytest.mark.parametrize("text", SPELLINGS)
def test_every_accepted_spelling_reads_the_same_raw_or_parsed_by_lmms_eval(text):
    parsed = simple_parse_args_string(f"faithful={text}")["faithful"]  # a bool, an int or the text itself
    assert strict_bool("faithful", text) is SPELLINGS[text]
    assert strict_bool("faithful", parsed) is SPELLINGS[text]


@pytest.mark.parametrize("value", [True, False])
def test_real_bools_pass_through(value):
    assert strict_bool("faithful", value) is value


@pytest.mark.parametrize("value", ["maybe", "", "2", 2, -1, 1.0, "on", "y", "t", None, "no way"])
def test_anything_else_is_refused_naming_key_value_and_spellings(value):
    with pytest.raises(UserError) as refused:
        strict_bool("log_keep_indices", value)
    assert f"log_keep_indices={value!r} is not a boolean" in str(refused.value)
    assert "true/false, yes/no, 1/0" in str(refused.value)


@pytest.mark.parametrize(("value", "expected"), [(4, 4), ("4", 4), (" 7 ", 7), (4.0, 4), ("-3", -3),
                                                 ("12345678901234567890", 12345678901234567890)])
def test_whole_numbers_are_read_from_ints_whole_floats_and_text(value, expected):
    assert whole_number("seed", value) == expected


@pytest.mark.parametrize("value", [2.5, "2.5", "abc", True, float("nan"), float("inf"), None, ""])
def test_fractions_bools_and_words_are_not_whole_numbers(value):
    with pytest.raises(UserError, match="is not a whole number"):
        whole_number("seed", value)


@pytest.mark.parametrize("value", [0, -1, "0", "-1", "auto", "auto:4", 2.5, True])
def test_positive_int_refuses_zero_negatives_and_words_with_the_usage(value):
    with pytest.raises(UserError, match=r"is not a whole number >= 1 \(use --batch_size N\)"):
        positive_int("batch_size", value, " (use --batch_size N)")
    assert positive_int("batch_size", "3") == 3

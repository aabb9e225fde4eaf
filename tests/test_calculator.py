"""The calculator tool's evaluator: Python's arithmetic for ``+ - * / **`` and
parentheses, JSON-ready results, and a ``CalculatorError`` (never a hang, a crash or a
memory spike) for everything else."""
from __future__ import annotations

import math
import re

import pytest

from sessions_app.agents.calculator import MAX_DEPTH, MAX_LENGTH, CalculatorError, evaluate


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("2*(3+4)", 14),
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("10 - 4 - 3", 3),
        ("100 / 10 / 5", 2),
        ("7 / 2", 3.5),
        ("1 / 3", 1 / 3),
        ("0.1 + 0.2", 0.1 + 0.2),
        ("3.5", 3.5),
        (".5 + .25", 0.75),
        ("2. * 3", 6),
        ("1e3", 1000),
        ("2.5E-2", 0.025),
        ("1e+2 + 1", 101),
        ("-3", -3),
        ("+3", 3),
        ("--3", 3),
        ("- + - 3", 3),
        ("2 * -3", -6),
        ("2 - -3", 5),
        ("-(2 + 3)", -5),
        ("2 ** 10", 1024),
        ("2 ** 0.5", math.sqrt(2)),
        ("4 ** 0.5", 2),
        ("(-8) ** 2", 64),
        ("(-2) ** 3", -8),
        ("0 ** 0", 1),
        ("  \t 1 +\n 1  ", 2),
        ("((((1))))", 1),
        ("2 ** 62", 2**62),
        ("9223372036854775807", 2**63 - 1),
    ],
)
def test_evaluates_arithmetic_like_python(expression: str, expected: float) -> None:
    assert evaluate(expression) == expected


def test_power_is_right_associative() -> None:
    assert evaluate("2 ** 3 ** 2") == 512


def test_power_binds_tighter_than_a_unary_minus_on_its_left() -> None:
    assert evaluate("-2 ** 2") == -4


def test_power_takes_a_unary_minus_on_its_right() -> None:
    assert evaluate("2 ** -1") == 0.5
    assert evaluate("2 ** -2 ** 2") == 0.0625


def test_multiplication_binds_tighter_than_addition() -> None:
    assert evaluate("2 + 3 * 4 ** 2") == 50


@pytest.mark.parametrize(
    "expression", ["6/3", "2.5*2", "1e3", "4 ** 0.5", "0.5 + 0.5", "-6 / 3", "2 * (3 + 4)"]
)
def test_whole_results_are_ints(expression: str) -> None:
    assert type(evaluate(expression)) is int


@pytest.mark.parametrize("expression", ["7/2", "0.1 + 0.2", "2 ** -1", "1 / 3", "-2.5"])
def test_fractional_results_are_floats(expression: str) -> None:
    assert type(evaluate(expression)) is float


def test_exact_integer_division_stays_exact() -> None:
    assert evaluate("(2 ** 62 + 1) * 2 / 2") == 2**62 + 1


def test_integers_beyond_64_bits_come_back_as_floats_json_can_carry() -> None:
    result = evaluate("2 ** 100")
    assert type(result) is float
    assert result == float(2**100)


def test_large_intermediate_integers_are_allowed_when_the_result_is_small() -> None:
    assert evaluate("10 ** 400 / 10 ** 399") == 10


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("", "empty"),
        ("   \n\t", "empty"),
        ("1 +", "ends too early"),
        ("* 2", "Unexpected '*'"),
        ("2 3", "Unexpected '3'"),
        ("(1 + 2", "never closed"),
        ("1 + 2)", "Unexpected ')'"),
        ("()", "Unexpected ')'"),
        ("1.2.3", "Unexpected '.3'"),
        ("1 / 0", "Division by zero"),
        ("1 / (2 - 2)", "Division by zero"),
        ("1.5 / 0.0", "Division by zero"),
        ("0 ** -1", "Division by zero"),
        ("(-8) ** 0.5", "no real value"),
        ("x", "Names and functions"),
        ("abs(-1)", "Names and functions"),
        ("__import__('os')", "Names and functions"),
        ("1.real", "Names and functions"),
        ("(1).real", "Unsupported character '.'"),
        ("pi * 2", "Names and functions"),
        ("1e", "Names and functions"),
        ("0x10", "Names and functions"),
        ("7 // 2", "Unexpected '/'"),
        ("7 % 2", "Unsupported character '%'"),
        ("1 << 2", "Unsupported character '<'"),
        ("1 & 2", "Unsupported character '&'"),
        ("~1", "Unsupported character '~'"),
        ("1 == 1", "Unsupported character '='"),
        ("1 < 2", "Unsupported character '<'"),
        ("[1]", "Unsupported character '['"),
        ("1, 2", "Unsupported character ','"),
        ("\u0661 + 1", "Unsupported character"),
        ("1e400", "too large"),
        ("1e308 * 10", "too large"),
        ("10.0 ** 400", "too large"),
        ("2 ** 0.5 * 1e308 * 10", "too large"),
        ("10 ** 300 * 10 ** 300", "too large"),
        ("(10 ** 400) * 1.0", "too large"),
        ("10 ** 400 / 3", "too large"),
    ],
)
def test_rejects_bad_expressions_with_a_clear_message(expression: str, message: str) -> None:
    with pytest.raises(CalculatorError, match=re.escape(message)):
        evaluate(expression)


def test_rejects_input_that_is_not_text() -> None:
    with pytest.raises(CalculatorError, match="text"):
        evaluate(12)  # type: ignore[arg-type]


@pytest.mark.timeout(5)
@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("9**9**9**9", "too large"),
        ("2**100000000", "too large"),
        ("10**10**10", "too large"),
        ("2**2**2**2**2", "too large"),
        ("(-10)**(10**300)", "too large"),
        ("1.5 ** (10 ** 400)", "too large"),
        ("9" * 499 + "**" + "9" * 499, "too large"),
        ("(" * 10_000 + "1" + ")" * 10_000, "too long"),
        ("-" * 100_000 + "1", "too long"),
        ("1" + "+1" * 100_000, "too long"),
        ("(" * 500 + "1" + ")" * 499, "nested too deeply"),
        ("2**" * 333 + "2", "nested too deeply"),
        ("(" * (MAX_DEPTH + 1) + "1" + ")" * (MAX_DEPTH + 1), "nested too deeply"),
    ],
)
def test_pathological_input_fails_fast(expression: str, message: str) -> None:
    with pytest.raises(CalculatorError, match=message):
        evaluate(expression)


@pytest.mark.timeout(5)
def test_nesting_up_to_the_limit_is_fine() -> None:
    assert evaluate("(" * MAX_DEPTH + "1" + ")" * MAX_DEPTH) == 1


@pytest.mark.timeout(5)
def test_a_long_run_of_signs_within_the_length_limit_is_fine() -> None:
    assert evaluate("-" * (MAX_LENGTH - 1) + "1") == -1


@pytest.mark.timeout(5)
def test_input_at_the_length_limit_is_accepted() -> None:
    terms = (MAX_LENGTH - 1) // 2
    expression = ("1" + "+1" * terms).ljust(MAX_LENGTH)
    assert len(expression) == MAX_LENGTH
    assert evaluate(expression) == terms + 1


@pytest.mark.timeout(5)
def test_a_big_multiplication_chain_stops_at_the_digit_limit() -> None:
    with pytest.raises(CalculatorError, match="too large"):
        evaluate("*".join(["9**1000"] * 5))

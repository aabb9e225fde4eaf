"""The ``calculator`` tool's arithmetic: ``+ - * / **``, parentheses, unary signs and
number literals, nothing else.

The expression comes from a model (or through it, from any user), so it is untrusted:
it is tokenized and evaluated by a small recursive-descent parser, never by ``eval`` or
``ast``, and every way to make Python spend unbounded time, memory or stack is refused
before it happens: input length, nesting depth, and the size of integers (checked with
logarithms *before* a power is computed). Every failure is a ``CalculatorError`` whose
message is shown to the user.

The grammar and precedence are Python's: ``**`` is right-associative and binds tighter
than a unary sign on its left (``-2**2 == -4``) but takes one on its right
(``2**-1 == 0.5``); ``/`` is true division. Literals may be integers, decimals (``3.5``,
``.5``, ``2.``) or use an exponent (``1e3``, ``2.5E-2``).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

Number = int | float

MAX_LENGTH = 1_000
# Parentheses and ``**`` chains recurse; 100 is far beyond any real calculation and far
# below Python's recursion limit.
MAX_DEPTH = 100
# A few thousand digits keeps every multiplication cheap, and stays under Python's own
# 4,300-digit limit on converting integers to and from text.
MAX_INT_DIGITS = 4_000
_MAX_INT_BITS = math.ceil(MAX_INT_DIGITS * math.log2(10))
# Results are written with orjson, which refuses integers outside 64 bits.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

_SPACE = re.compile(r"[ \t\r\n]+")
_NUMBER = re.compile(r"(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_OPERATOR = re.compile(r"\*\*|[-+*/()]")
_NAME = re.compile(r"[^\W\d]\w*")


class CalculatorError(Exception):
    """The expression cannot be calculated; the message says why, for the user."""


@dataclass(frozen=True)
class _Token:
    kind: str  # "number" or "op"
    text: str
    position: int  # 1-based, as a person counts characters


def evaluate(expression: str) -> int | float:
    """The value of ``expression``: an ``int`` when it is a whole number that fits in
    64 bits, otherwise a finite ``float``."""
    if not isinstance(expression, str):
        raise CalculatorError("The expression must be text.")
    if len(expression) > MAX_LENGTH:
        raise CalculatorError(f"The expression is too long (at most {MAX_LENGTH} characters).")
    tokens = _tokenize(expression)
    if not tokens:
        raise CalculatorError("The expression is empty.")
    try:
        value = _Parser(tokens).parse()
    except ArithmeticError:
        # The operations below check for these; this only keeps a case they missed an
        # error in the user's arithmetic rather than a crash of the tool.
        raise CalculatorError("The result is too large or undefined.") from None
    return _as_json_number(value)


def _tokenize(expression: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(expression):
        if match := _SPACE.match(expression, pos):
            pos = match.end()
            continue
        for kind, pattern in (("number", _NUMBER), ("op", _OPERATOR)):
            if match := pattern.match(expression, pos):
                tokens.append(_Token(kind, match.group(), pos + 1))
                pos = match.end()
                break
        else:
            if match := _NAME.match(expression, pos):
                raise CalculatorError(
                    f"Names and functions are not supported (found {match.group()!r} at "
                    f"position {pos + 1}); use numbers with + - * / ** and parentheses."
                )
            raise CalculatorError(
                f"Unsupported character {expression[pos]!r} at position {pos + 1}; "
                "use numbers with + - * / ** and parentheses."
            )
    return tokens


class _Parser:
    """Evaluates while it parses; there is no tree to build or walk.

    sum     := product (("+" | "-") product)*
    product := unary (("*" | "/") unary)*
    unary   := ("+" | "-")* power
    power   := atom ("**" unary)?
    atom    := NUMBER | "(" sum ")"
    """

    def __init__(self, tokens: list[_Token]) -> None:
        self._tokens = tokens
        self._next = 0
        self._depth = 0

    def parse(self) -> Number:
        value = self._sum()
        if self._next < len(self._tokens):
            raise self._unexpected()
        return value

    def _sum(self) -> Number:
        value = self._product()
        while self._peek() in ("+", "-"):
            op = self._take().text
            right = self._product()
            value = _arithmetic(op, value, right)
        return value

    def _product(self) -> Number:
        value = self._unary()
        while self._peek() in ("*", "/"):
            op = self._take().text
            right = self._unary()
            value = _arithmetic(op, value, right)
        return value

    def _unary(self) -> Number:
        # A loop, not recursion, so a long run of signs costs no stack.
        negative = False
        while self._peek() in ("+", "-"):
            negative ^= self._take().text == "-"
        value = self._power()
        return -value if negative else value

    def _power(self) -> Number:
        base = self._atom()
        if self._peek() != "**":
            return base
        self._take()
        with self._nested():
            exponent = self._unary()
        return _power(base, exponent)

    def _atom(self) -> Number:
        if self._next >= len(self._tokens):
            raise CalculatorError("The expression ends too early; a number is missing.")
        token = self._take()
        if token.kind == "number":
            return _number(token.text)
        if token.text == "(":
            with self._nested():
                value = self._sum()
            if self._peek() != ")":
                if self._next >= len(self._tokens):
                    raise CalculatorError(f"The '(' at position {token.position} is never closed.")
                raise self._unexpected()
            self._take()
            return value
        self._next -= 1
        raise self._unexpected()

    @contextmanager
    def _nested(self) -> Iterator[None]:
        self._depth += 1
        if self._depth > MAX_DEPTH:
            raise CalculatorError(f"The expression is nested too deeply (at most {MAX_DEPTH} levels).")
        yield
        self._depth -= 1

    def _peek(self) -> str | None:
        return self._tokens[self._next].text if self._next < len(self._tokens) else None

    def _take(self) -> _Token:
        token = self._tokens[self._next]
        self._next += 1
        return token

    def _unexpected(self) -> CalculatorError:
        token = self._tokens[self._next]
        return CalculatorError(f"Unexpected {token.text!r} at position {token.position}.")


def _number(text: str) -> Number:
    if text.isdigit():
        return int(text)
    return _checked(float(text))


def _checked(value: Number) -> Number:
    if isinstance(value, int):
        if value.bit_length() > _MAX_INT_BITS:
            raise _too_large()
    elif not math.isfinite(value):
        raise _too_large()
    return value


def _arithmetic(op: str, left: Number, right: Number) -> Number:
    if op == "/":
        if right == 0:
            raise CalculatorError("Division by zero.")
        if isinstance(left, int) and isinstance(right, int) and left % right == 0:
            return left // right  # exact, where true division would round big quotients
    try:
        # Mixing a float with an integer too big for a float raises OverflowError.
        if op == "+":
            return _checked(left + right)
        if op == "-":
            return _checked(left - right)
        if op == "*":
            return _checked(left * right)
        return _checked(left / right)
    except OverflowError:
        raise _too_large() from None


def _power(base: Number, exponent: Number) -> Number:
    if isinstance(base, int) and isinstance(exponent, int) and exponent >= 0:
        # The result has about exponent * log2|base| bits; refuse before computing it.
        # The first test also keeps a huge exponent out of the float multiplication.
        if abs(base) > 1 and (
            exponent > _MAX_INT_BITS or exponent * math.log2(abs(base)) > _MAX_INT_BITS
        ):
            raise _too_large()
        power: int | float = base**exponent
        return power
    try:
        base_f, exponent_f = float(base), float(exponent)
    except OverflowError:
        raise _too_large() from None
    if base_f == 0 and exponent_f < 0:
        raise CalculatorError("Division by zero (zero to a negative power).")
    if base_f < 0 and not exponent_f.is_integer():
        raise CalculatorError("A negative number to a fractional power has no real value.")
    try:
        return _checked(math.pow(base_f, exponent_f))
    except OverflowError:
        raise _too_large() from None


def _as_json_number(value: Number) -> Number:
    if isinstance(value, float) and value.is_integer() and _INT64_MIN <= value <= _INT64_MAX:
        return int(value)
    if isinstance(value, int) and not _INT64_MIN <= value <= _INT64_MAX:
        # JSON encoders here stop at 64-bit integers; a float keeps the magnitude.
        try:
            return _checked(float(value))
        except OverflowError:
            raise _too_large() from None
    return value


def _too_large() -> CalculatorError:
    return CalculatorError("The result is too large to calculate.")

"""Which answers the verifier rejects unparsed: a cheap structural scan (`too_expensive`) bounds how
large each literal subexpression of an answer can get, so that answers astronomically large by
construction (power towers, numbers of more than `MAX_DIGITS` digits built from powers, factorials
and binomials of literals, high powers of compound symbolic bases) score 0 without ever reaching
sympy, like answers over `MAX_ANSWER_CHARS` characters or with unbalanced braces (`rejected`)."""
from __future__ import annotations

import math
import re

MAX_ANSWER_CHARS = 1000  # longer (or brace-unbalanced) answers are not parsed at all: counted as rejected
MAX_DIGITS = 100_000  # a power / factorial / binomial of literals larger than 10^MAX_DIGITS is rejected unparsed
MAX_TOWER = 3  # `a^{b^{c^{d}}}` (three carets) passes the scan, a fourth level is rejected
MAX_COMPOUND_EXPONENT = 200  # `(x+1)^{n}`: sympy expands it (n = 1,000: seconds); larger n is rejected
MAX_NESTING = 50  # brackets nested deeper than this are rejected


def _balanced(text: str) -> bool:
    """Braces balance (a malformed LaTeX answer is rejected without parsing)."""
    depth = 0
    for char in text:
        depth += {"{": 1, "}": -1}.get(char, 0)
        if depth < 0:
            return False
    return depth == 0


# --- the structural scan ------------------------------------------------------------------------

class _Reject(Exception):
    pass


_TOKEN = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+|\\[A-Za-z]+|\\.|\*\*|\s+|.", re.DOTALL)
_NUMBER = re.compile(r"\.?[0-9]")
_OPEN = {"{", "(", "[", "\\{", "\\lbrace", "\\langle", "\\lfloor", "\\lceil"}
_CLOSE = {"}", ")", "]", "\\}", "\\rbrace", "\\rangle", "\\rfloor", "\\rceil"}
_IGNORED = {"\\left", "\\right", "\\,", "\\;", "\\:", "\\!", "\\ ", "$", "\\displaystyle", "\\textstyle",
            "\\quad", "\\qquad", "\\limits", "\\nolimits"}
_OPERATORS = {"\\cdot", "\\times", "\\div", "\\pm", "\\mp", "\\%", "\\ast"}  # between units: no size of their own
_ONE_ARG = {"\\sqrt", "\\overline", "\\mathrm", "\\mathbf", "\\operatorname", "\\text", "\\textbf", "\\mbox"}
_TWO_ARGS = {"\\frac", "\\dfrac", "\\tfrac", "\\cfrac"}
_BINOMS = {"\\binom", "\\dbinom", "\\tbinom"}
_LOG2 = math.log10(2)


def _power_of_ten(log: float) -> float:
    return 10.0 ** log if log < 300 else math.inf


class _Scanner:
    """Recursive descent over LaTeX-ish tokens that bounds how big each literal subexpression can get.

    Each unit gets a size: an upper bound on log10 of its value (of numerator and denominator alike for
    a fraction; at least log10 2), or None when it involves a symbol. A group's size is the sum of its
    units' (a bound for their sums, products and quotients alike); a power's is 10^size(exponent) x
    size(base); a factorial's n log10 n. Over-estimates are fine: only sizes over MAX_DIGITS are rejected,
    and no sensible final answer has a hundred thousand digits. Carets nested deeper than MAX_TOWER, and
    a compound symbolic base (`(x+1)`, not `x`) raised past MAX_COMPOUND_EXPONENT, are rejected too."""

    def __init__(self, text: str):
        self.tokens = [t for t in _TOKEN.findall(text) if not t.isspace() and t not in _IGNORED]
        self.i = 0
        self.depth = 0  # brackets
        self.tower = 0  # carets around the current token

    def peek(self) -> str | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def scan(self) -> None:
        while self.i < len(self.tokens):
            self.group()  # a stray closing bracket at the top level ends a "group": carry on after it

    def group(self) -> float | None:
        """Units up to the closing bracket (or the end); the opening one is already consumed."""
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise _Reject
        total: float | None = 0.0
        while (tok := self.peek()) is not None and tok not in _CLOSE:
            if tok in _OPERATORS or not (tok[0].isalnum() or tok[0] == "\\" or tok in _OPEN or _NUMBER.match(tok)):
                self.i += 1  # an operator, punctuation, or a stray ^ _ !: nothing to bound
                continue
            size = self.unit()
            total = None if total is None or size is None else total + size
        self.i += 1  # the closing bracket (past the end: harmless)
        self.depth -= 1
        return None if total is None else max(total, _LOG2)

    def unit(self) -> float | None:
        """A power with its factorials: `atom (_ atom)* (^ unit)? !*`."""
        size, compound = self.atom()
        while self.peek() == "_":  # a subscript names a symbol: scanned for rejects, not for size
            self.i += 1
            self.atom()
        if self.peek() in ("^", "**"):
            self.i += 1
            self.tower += 1
            if self.tower > MAX_TOWER:
                raise _Reject
            exponent = self.unit()  # right-associative: a^b^c = a^(b^c)
            self.tower -= 1
            if exponent is None:
                size = None
            elif size is not None:
                size = _power_of_ten(exponent) * size
            elif compound and _power_of_ten(exponent) > MAX_COMPOUND_EXPONENT:
                raise _Reject
        while self.peek() == "!":
            while self.peek() == "!":  # n!! <= n!
                self.i += 1
            if size is not None:
                value = _power_of_ten(size)
                size = max(_LOG2, value * math.log10(value))
        if size is not None and size > MAX_DIGITS:
            raise _Reject
        return size

    def atom(self) -> tuple[float | None, bool]:
        """(size, compound) of a number, a bracketed group, a command with its arguments, or a symbol."""
        tok = self.peek()
        if tok is None or tok in _CLOSE:
            return None, False
        self.i += 1
        if _NUMBER.match(tok):
            digits = tok.split(".")[0].lstrip("0")
            return (math.log10(max(float(tok), 2.0)) if len(digits) < 15 else float(len(digits))), False
        if tok in _OPEN:
            return self.group(), True
        if tok in _TWO_ARGS:
            first, second = self.argument(), self.argument()
            return (None if first is None or second is None else first + second), True
        if tok in _BINOMS:
            n, k = self.argument(), self.argument()
            if n is None or k is None:
                return None, True
            return max(_LOG2, min(_power_of_ten(n) * _LOG2, _power_of_ten(k) * n)), True  # C(n,k) <= 2^n, n^k
        if tok in _ONE_ARG:
            if self.peek() == "[":  # \sqrt[n]{...}
                self.i += 1
                self.group()
            return self.argument(), True
        if tok == "\\pi":
            return math.log10(math.pi), False
        return None, False  # a letter or any other command: a symbol

    def argument(self) -> float | None:
        if self.peek() in _OPEN:
            self.i += 1
            return self.group()
        return self.atom()[0]


def too_expensive(answer: str) -> bool:
    """Whether an answer's structure makes it astronomically expensive to parse or compare (see _Scanner):
    a power tower more than MAX_TOWER high, a power/factorial/binomial of literals over MAX_DIGITS digits,
    a compound symbolic base raised past MAX_COMPOUND_EXPONENT, brackets nested past MAX_NESTING.
    Linear in the answer's length."""
    try:
        _Scanner(answer).scan()
    except (_Reject, RecursionError):
        return True
    return False


def rejected(answer: str) -> bool:
    """Whether an answer is scored 0 unparsed: over MAX_ANSWER_CHARS characters, braces unbalanced, or
    `too_expensive`."""
    return len(answer) > MAX_ANSWER_CHARS or not _balanced(answer) or too_expensive(answer)

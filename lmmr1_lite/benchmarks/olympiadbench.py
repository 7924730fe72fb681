"""OlympiadBench, English text-only maths (Hothan/OlympiadBench, config "OE_TO_maths_en_COMP", split "train").

Columns used: id, question, final_answer (a list; the judge reads its first item), is_multiple_answer, unit,
answer_type, error (tolerance: one number, or one per answer separated by commas), subfield.
Prompt (cot): the official English maths prompt (OpenBMB/OlympiadBench inference/code/evaluators/evaluator.py,
make_prompt + make_input: preamble, answer type, "So the final answer is \\boxed{...}", then the question).
Score, after OpenBMB/OlympiadBench inference/code/math_judger.py (MathJudger.judge) and inference/judge.py:
- the prediction is every \\boxed{} of the answer region joined by commas (their preprocess);
- both sides are cleaned ($, \\left, \\right, degrees, %, "\\in", \\mathrm{}), split at top-level commas,
  and \\pm expands into + and -; the lists must have equal length and pair up one to one, in any order;
- two numbers (plain or in scientific notation, `7.1 \\cdot 10^{35}`) are equal when |gold - pred| <= error * 1.01,
  gold also tried as gold/100 and gold*100 (their numerical_equal; default error 1e-8, none for "Tuple" answers);
- a gold `x = 5` against a bare `5` (or the reverse) compares the values after "=" (their expression_equal);
- golds of any number of items (a prediction must have as many);
- anything else goes through math-verify (theirs: sympy parse_latex; ours: the bounded-time verifier).
"""
from __future__ import annotations

import re
from functools import partial

from .base import Benchmark, Check
from .extract import all_boxed, answer_block
from ..rewards import _quick_verdict

DEFAULT_ERROR = 1e-8
# scientific notation: "7.1 \cdot 10^{35}", "7.1\times10^{-3}", "7.1 \times 10^35"
_SCIENTIFIC = re.compile(r"(-?[0-9]*\.?[0-9]+)\s*(?:\\cdot|\\times|\*|×)\s*10\s*\^\s*\{?\s*([+-]?[0-9]+)\s*\}?")
_TYPES = {"Numerical": "a numerical value", "Expression": "an expression", "Equation": "an equation",
          "Interval": "an interval"}
_CLEAN = (("\\left", ""), ("\\right", ""), ("∶", ":"), ("，", ","), ("$", ""), ("\\approx", "="), ("\\simeq", "="),
          ("\\sim", "="), ("^\\prime", "'"), ("^{\\prime}", "'"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""),
          ("%", ""))
_WRAPPED = re.compile(r"\\(?:mathrm|mathbf|text|textbf|rm)\{~?([^{}]*)\}")  # their \mathrm{~x} -> x, and \text


def answer_type_text(row: dict) -> str:
    """Their get_answer_type_text, English: what kind of answer, or "" for tuples and proofs."""
    kind, multiple = str(row.get("answer_type") or ""), bool(row.get("is_multiple_answer"))
    if not kind or "Tuple" in kind or "Need_human_evaluate" in kind:
        return ""
    names = [next((text for key, text in _TYPES.items() if key in part), "a value") for part in kind.split(",")]
    if not multiple:
        return f"The answer of The problem should be {names[0]}. "
    if len(set(names)) == 1:
        return f"The problem has multiple answers, each of them should be {names[0]}. "
    return f"The problem has multiple answers, with the answers in order being {', '.join(names)}. "


def clean(expression: str, unit: str = "") -> str:
    """Their preprocess' symbol map and strip, plus the row's unit (asked to be outside the box)."""
    if "\\in " in expression:
        expression = expression.split("\\in ", 1)[1]
    for old, new in _CLEAN:
        expression = expression.replace(old, new)
    expression = _WRAPPED.sub(r"\1", expression)
    unit = _WRAPPED.sub(r"\1", unit.replace("$", "")).replace("~", "").strip()
    if unit and expression.rstrip().endswith(unit):
        expression = expression.rstrip()[: -len(unit)]
    return expression.strip("\n$,.:;^_=+`!@#%&*~，。 ")


def split_items(expression: str) -> list[str]:
    """Top-level comma split (brackets protect tuples and intervals), \\pm expanded into + and -."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(expression):
        depth += (char in "([{") - (char in ")]}")
        if char == "," and depth == 0:
            items.append(expression[start:i].strip())
            start = i + 1
    items.append(expression[start:].strip())
    return [v for item in items if item for v in ([item.replace("\\pm", "+"), item.replace("\\pm", "-")]
                                                    if "\\pm" in item else [item])]


def tolerances(row: dict, count: int) -> list[float]:
    """The `error` column as one tolerance per gold item (their judge.py; a blank entry means 1e-8)."""
    error = row.get("error")
    if not error or "Tuple" in str(row.get("answer_type") or ""):
        return [DEFAULT_ERROR] * count
    values = [float(p) if p.strip() else DEFAULT_ERROR for p in str(error).split(",")]
    return values if len(values) == count else [values[0]] * count


def number(text: str) -> float | None:
    """A plain number ("3.14", "1e-3") or one in scientific notation ("7.1 \\cdot 10^{35}"), else None."""
    text = text.strip()
    scientific = _SCIENTIFIC.fullmatch(text)
    try:
        return float(scientific.group(1)) * 10.0 ** int(scientific.group(2)) if scientific else float(text)
    except (ValueError, OverflowError):
        return None


def numbers_equal(gold: str, predicted: str, error: float) -> bool | None:
    """Their numerical_equal (gold also tried as gold/100 and gold*100), in scientific notation too, where
    their expression_equal applies the same tolerance; None when either side is not a number."""
    reference, value = number(gold), number(predicted)
    if reference is None or value is None:
        return None
    return any(abs(candidate - value) <= error * 1.01 for candidate in (reference / 100, reference, reference * 100))


def value_side(gold: str, predicted: str) -> tuple[str, str]:
    """Their expression_equal compares what follows "=": a gold `x = 5` against a bare `5` (or the reverse)
    compares 5 with 5; two equations stay whole (their equation_equal)."""
    if ("=" in gold) != ("=" in predicted):
        gold, predicted = (side.split("=")[1].strip() if "=" in side else side for side in (gold, predicted))
    return gold, predicted


def match_all(size: int, verdicts: list[bool], undecided: list[tuple[int, int]], known: dict) -> bool:
    """Their judge's pairing: every gold item finds a distinct equal predicted item."""
    equal = dict(known)
    equal.update(zip(undecided, verdicts))
    free = set(range(size))
    for i in range(size):
        j = next((j for j in sorted(free) if equal.get((i, j))), None)
        if j is None:
            return False
        free.discard(j)
    return True


class OlympiadBench(Benchmark):
    rule = ("OpenBMB's MathJudger: every \\boxed{} joined, items paired in any order, numbers (also in scientific "
            "notation) within the row's error, `x = v` against `v`; math-verify where theirs uses sympy's parse_latex")
    PAPER_EVAL = ("lmms-eval's olympiadbench task (the same judge, rule-based); it passes `error` as text, so its "
                  "tolerances never apply; ours applies them as OpenBMB's judge.py does")

    def question(self, row: dict) -> str:
        return f"{answer_type_text(row)}{str(row['question']).strip()}"

    def cot_prompt(self, row: dict) -> str:
        box = "\\boxed{multiple answers connected with commas}" if row.get("is_multiple_answer") else "\\boxed{answer}"
        unit_note = ", note that the unit of the answer should not be included in \\boxed{}" if row.get("unit") else ""
        box += "(unit)" if row.get("unit") else ""
        return ("The following is an open-ended problem from an International Math competition. "
                f"{answer_type_text(row)}Please calculate the answer according to the given requirements and the "
                "information provided. Please use LaTeX format to represent the variables and formulas used in the "
                f"solution process and results. Please end your solution with \"So the final answer is {box}.\" and "
                f"give the result explicitly{unit_note}.\n{str(row['question']).strip()}")

    def gold(self, row: dict) -> str:
        answer = row["final_answer"]
        return str(answer[0] if isinstance(answer, (list, tuple)) else answer).strip()

    def extract(self, row: dict, completion: str) -> str | None:
        """Every \\boxed{} of the answer block (else of the whole completion) joined by commas, else the
        generic extraction ("So the final answer is ...")."""
        region = answer_block(completion) if isinstance(completion, str) else None
        boxes = all_boxed(region if region is not None else completion or "")
        return ", ".join(b for b in boxes if b.strip()) or super().extract(row, completion)

    def judge(self, row: dict, completion: str) -> bool | Check:
        predicted = self.extract(row, completion)
        if not predicted:
            return False
        unit = str(row.get("unit") or "")
        golds, preds = split_items(clean(self.gold(row))), split_items(clean(predicted, unit))
        if not golds or len(golds) != len(preds):
            return False
        known, undecided = {}, []
        for i, (gold_item, error) in enumerate(zip(golds, tolerances(row, len(golds)))):
            for j, pred_item in enumerate(preds):
                gold, pred = value_side(gold_item, pred_item)
                verdict = numbers_equal(gold, pred, error)
                verdict = _quick_verdict(pred, gold) if verdict is None else verdict
                if verdict is None:
                    undecided.append((i, j))
                else:
                    known[(i, j)] = verdict
        combine = partial(match_all, len(golds), undecided=undecided, known=known)
        if not undecided:
            return combine([])
        return Check([value_side(golds[i], preds[j])[::-1] for i, j in undecided], combine)

    def details(self, row: dict) -> dict:
        return {"subfield": row.get("subfield"), "answer_type": row.get("answer_type"),
                "multiple_answers": bool(row.get("is_multiple_answer"))}


BENCHMARK = OlympiadBench(
    name="olympiadbench", paper_column="OlympiadBench", modality="text", hub_id="Hothan/OlympiadBench",
    split="train", config="OE_TO_maths_en_COMP", required=("question", "final_answer"), id_column="id",
    sources=("OpenBMB/OlympiadBench inference/code/math_judger.py", "OpenBMB/OlympiadBench inference/judge.py",
             "OpenBMB/OlympiadBench inference/code/evaluators/evaluator.py"))

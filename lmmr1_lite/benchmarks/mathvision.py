"""MathVision (MathLLMs/MathVision, split "testmini"; LMM-R1's script ran the 3,040-row "test" split).

Columns: id, question, options (a list, empty for free-form), image (a path, "images/1.jpg"),
decoded_image (the image), answer (a letter A-E for multiple choice), solution, level, subject.
Prompt: as LMM-R1's lmms-eval task (ForJadeForest/lmm-r1-eval lmms_eval/tasks/mathvision/mathvision_evals.py,
create_one_query, shot type "step-by-step"): "Question: ...", "Choices:" with "(A) text" lines, then the hint
for the answer's kind; the `<image1>` markers of the question are dropped (the image comes first in the user
turn). Cot mode adds the boxed-answer instruction.
Score, by `MathVision.lenient` (eval.md says which):
- official (default): mathllm/MATH-V evaluation/evaluate.py + utils.py, as lmms-eval's mathvision_process_results
  runs it: a closing " C." or a first line "C" reads as the letter; "... is 5." as the number; without a
  `\\boxed{}`, the text after the last "the final answer is" / "the answer is" / "the correct answer is" / "the
  answer should be" (to the end of its line and sentence); with several boxes, the last; then their
  find_math_answer normalisation (lower case, spaces, `\\text`, `\\left`, degrees, units, `x = v` -> v,
  `0.5` -> `\\frac{1}{2}`, `a/b` -> `\\frac{a}{b}`...). Right when that equals the gold (the letter, for a
  multiple-choice row) or the gold option's text: as text, tuple by tuple, else as a value (theirs: latex2sympy
  evaluated and rounded to 2 decimals; ours: plain numbers rounded to 2 decimals, anything else math-verify).
  So "Option D", "\\boxed{(D) 8/11}", "B. 2" and a sentence score 0, as there. In lmmr1 mode their rule reads
  the `<answer>` block (else the completion without its `<think>` block) as the response;
- lenient (`MathVision.lenient = True`): the kit's extraction and option resolution (letters, "Option D",
  "(D) text", the option's text, prose), as for MathVerse.
"""
from __future__ import annotations

import re
from typing import ClassVar

from ..answers import answer_block, outside_think
from .base import Benchmark, Check, math_equal
from .choices import letters_for, options_dict, resolve

_IMAGE_TAG = re.compile(r"<image\d*>")
_INTEGER = re.compile(r"-?[0-9]+")
_RATIONAL = re.compile(r"(-?)\\frac\{(-?[0-9]+(?:\.[0-9]+)?)\}\{(-?[0-9]+(?:\.[0-9]+)?)\}")
FLAGS = ("the final answer is", "the answer is", "the correct answer is", "the answer should be")


def is_number(text: str) -> bool:
    """Their is_number: whatever Python's float() reads."""
    try:
        float(text)
    except (ValueError, OverflowError):
        return False
    return True


def _braced(text: str, command: str) -> str:
    """`\\sqrt2` -> `\\sqrt{2}`, `\\frac12` -> `\\frac{1}{2}` (their _fix_sqrt / _fix_fracs)."""
    pieces = text.split(command)
    out = pieces[0]
    for piece in pieces[1:]:
        if command == "\\sqrt":
            out += command + (piece if not piece or piece[0] == "{" else "{" + piece[0] + "}" + piece[1:])
            continue
        if piece[:1] == "{":
            out += command + piece
        elif len(piece) < 2:
            return text
        elif piece[1] != "{":
            out += command + "{" + piece[0] + "}{" + piece[1] + "}" + piece[2:]
        else:
            out += command + "{" + piece[0] + "}" + piece[1:]
    return out


def strip_string(text: str) -> str:
    """Their _strip_string: the MATH dataset's answer normalisation."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"), ("\\left", ""),
                     ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""), ("$", "")):
        text = text.replace(old, new)
    text = text.split("\\text{ ")[0]  # units on the right
    text = text.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not text:
        return text
    text = "0" + text if text[0] == "." else text
    for sign in ("=", "\\approx"):
        if text.count(sign) == 1:
            text = text.split(sign)[-1]
    text = _braced(text, "\\sqrt") if "sqrt" in text else text
    text = text.replace(" ", "")
    text = _braced(text, "\\frac") if "sqrt" in text else text
    text = "\\frac{1}{2}" if text == "0.5" else text
    if text.count("/") == 1:  # their _fix_a_slash_b: "3/4" -> \frac{3}{4}
        a, b = text.split("/")
        if _INTEGER.fullmatch(a) and _INTEGER.fullmatch(b) and text == f"{int(a)}/{int(b)}":
            text = f"\\frac{{{int(a)}}}{{{int(b)}}}"
    return text


def find_math_answer(text: str) -> str:
    """Their find_math_answer: the last box's content (to the last "}"), its value after "=", cleaned."""
    text = text.lower().replace("{}", "")
    box = text.rfind("oxed{")
    answer = text[box + len("oxed{"): text.rfind("}")] if box >= 0 and text.rfind("}") > box + 4 else text
    close, open_ = answer.find("}"), answer.find("{")
    if close != -1 and (open_ == -1 or close < open_):
        answer = answer.split("}")[0]
    answer = answer.split("=")[-1].split("\\approx")[-1]
    for old, new in ((" ", ""), ("\\,", ""), ("∞", "\\infty"), ("+\\infty", "\\infty"), ("\\\\", "\\"), ("\n", ""),
                     ("\\text", ""), ("\\mbox", ""), ("bmatrix", "pmatrix"), ("\\left", ""), ("\\right", ""),
                     ("^{\\circ}", ""), ("^\\circ", ""), ("{m}^3", ""), ("m^3", ""), ("{units}", ""), ("units", ""),
                     ("{km}", ""), ("km", "")):
        answer = answer.replace(old, new)
    return strip_string(answer)


def official_answer(completion: str) -> str:
    """The answer MATH-V's evaluate.py reads from a response (lmms-eval mathvision_process_results), in
    linear time: every step is a split, find or replace."""
    answer = completion.strip()
    for c in "ABCDE":
        if answer.endswith((f" {c}.", f" ({c}).")) or answer.startswith((f"{c}\n", f"({c})\n", f"({c}) {c}\n")):
            answer = c
    if is_number(answer.split("is ")[-1].rstrip(".")):
        answer = answer.split("is ")[-1].rstrip(".")
    if "oxed{" not in answer:
        for flag in FLAGS:
            for spelling in (flag, flag.replace("the", "The")):
                found = spelling in answer
                answer = answer.split(spelling)[-1].strip()
                if found:
                    answer = answer.split("\n")[0].split(". ")[0]
    elif answer.count("oxed{") > 1:
        answer = "\\boxed{" + answer.split("oxed{")[-1]
    answer = find_math_answer(answer)
    for c in "abcde":
        answer = answer.replace(f"({c})", c).replace(f"{{{c}}}", c)
    return answer.rstrip(".").lstrip(":").strip()


def _tuple_values(text: str) -> str:
    """Their eval_tuple, for plain-number items: "(1.005, 2)" -> "(1.0,2)" (items rounded to 2 decimals)."""
    items = text[1:-1].split(",")
    if len(text) < 2 or len(items) < 2 or (text[0], text[-1]) not in (("(", ")"), ("[", "]")):
        return text
    try:
        values = [item if "infty" in item or item in ("a", "-a") else str(round(float(item), 2)) for item in items]
    except ValueError:
        return text
    return f"{text[0]}{','.join(values)}{text[-1]}"


def value(text: str) -> float | None:
    """The number a normalised answer stands for, where their `eval(str(latex2sympy(x)))` gets one: a plain
    number or a fraction of two (`\\frac{3}{4}`, `-\\frac{1}{2}`, `8/11`); None for anything symbolic (there, a
    NameError: `sqrt(3)`, `pi` and symbols never compare as values)."""
    text = text.strip()
    match = _RATIONAL.fullmatch(text)
    try:
        if match:
            return (-1 if match.group(1) else 1) * float(match.group(2)) / float(match.group(3))
        if text.count("/") == 1 and all(_INTEGER.fullmatch(part) for part in text.split("/")):
            numerator, denominator = text.split("/")
            return int(numerator) / int(denominator)
        return float(text) if text.lstrip("-")[:1].isdigit() or text.lstrip("-")[:2][1:].isdigit() else None
    except (ValueError, ZeroDivisionError, OverflowError):
        return None


def official_equal(predicted: str, gold: str) -> bool:
    """Their is_equal(gold, predicted): text, then tuples, then value rounded to 2 decimals."""
    predicted, gold = predicted.lower(), gold.lower()
    if not predicted.replace(" ", "") or not gold.replace(" ", ""):
        return False
    if predicted.strip() == gold.strip() or _tuple_values(predicted) == _tuple_values(gold):
        return True
    a, b = value(predicted), value(gold)
    return a is not None and b is not None and round(a, 2) == round(b, 2)


def numbers_close(predicted: str, gold: str) -> bool | None:
    """Their is_equal on plain numbers: equal after rounding to 2 decimals; None when not two numbers."""
    try:
        return round(float(predicted), 2) == round(float(gold), 2)
    except ValueError:
        return None


def hint(row: dict) -> str:
    """Their step-by-step hint, chosen by the kind of answer (letter, integer, 1 or 2 decimals, LaTeX)."""
    answer = str(row["answer"]).strip()
    if row.get("options"):
        return "Hint: Please answer the question and provide the correct option letter, e.g., A, B, C, D, at the end."
    if answer.isnumeric():
        return ("Hint: Please answer the question requiring an integer answer and provide the final value, "
                "e.g., 1, 2, 3, at the end.")
    decimals = len(answer.split(".")[1]) if "." in answer and numbers_close(answer, "0") is not None else 0
    if decimals == 1:
        return ("Hint: Please answer the question requiring a floating-point number with one decimal place and "
                "provide the final value, e.g., 1.2, 1.3, 1.4, at the end.")
    if decimals == 2:
        return ("Hint: Please answer the question requiring a floating-point number with two decimal places and "
                "provide the final value, e.g., 1.23, 1.34, 1.45, at the end.")
    return ("Hint: Please answer the question requiring a latex expression as an answer and provide the final "
            "expression, e.g., 2\\sqrt{3}, \\frac{1}{3}, at the end.")


class MathVision(Benchmark):
    lenient: ClassVar[bool] = False  # True: the kit's extraction and option resolution instead of MATH-V's own rule
    SCORINGS = {"official": {"lenient": False}, "lenient": {"lenient": True}}
    PAPER_EVAL = ("lmms-eval's mathvision task, whose standard metric is MATH-V's rule (as our default); lmms-eval "
                  "also offers a GPT-judge variant, which reads prose this rule scores 0")

    @property
    def rule(self) -> str:
        if self.lenient:
            return ("lenient (not MATH-V's rule): the kit's extraction; an option named by letter, 'Option D', "
                    "'(D) text' or its text; free-form by 2-decimal rounding or math-verify")
        return ("MATH-V's official rule (evaluate.py, as lmms-eval runs it): its answer reading and "
                "find_math_answer, equal to the gold letter or the gold option's text; values rounded to 2 "
                "decimals (math-verify where theirs evaluates LaTeX with latex2sympy)")

    def question(self, row: dict) -> str:
        text = "Question: " + _IMAGE_TAG.sub("", str(row["question"])).strip()
        options = options_dict(row.get("options"))
        if options:
            text += "\nChoices:\n" + "\n".join(f"({letter}) {option}" for letter, option in options.items())
        return f"{text}\n{hint(row)}"

    def letters(self, row: dict) -> str:
        return letters_for(len(row.get("options") or []))

    def options(self, row: dict) -> dict[str, str]:
        return options_dict(row.get("options"))

    def image_refs(self, row: dict) -> list:
        return [row.get("decoded_image") or row.get("image")]

    def extract(self, row: dict, completion: str) -> str | None:
        if self.lenient or not isinstance(completion, str):
            return super().extract(row, completion)
        block = answer_block(completion)  # lmmr1 mode: their rule reads the <answer> block as the response
        return official_answer(block if block is not None else outside_think(completion)) or None

    def judge(self, row: dict, completion: str) -> bool | Check:
        predicted, gold = self.extract(row, completion), self.gold(row)
        if not predicted:
            return False
        options = self.options(row)
        if not self.lenient:
            return official_equal(predicted, gold) or bool(options) and official_equal(predicted, options.get(gold, ""))
        if options:
            letter = resolve(predicted, options)
            if letter is not None:
                return letter == gold
            gold = options.get(gold, "")  # no letter named: compare with the gold option's text
        close = numbers_close(predicted, gold)
        return math_equal(predicted, gold) if close is None else close

    def details(self, row: dict) -> dict:
        return {"subject": row.get("subject"), "level": row.get("level"),
                "question_type": "multi_choice" if row.get("options") else "free_form"}


BENCHMARK = MathVision(
    name="mathvision", paper_column="MathVision", modality="multimodal", hub_id="MathLLMs/MathVision",
    split="testmini", required=("question", "answer"), id_column="id",
    sources=("mathllm/MATH-V evaluation/evaluate.py", "ForJadeForest/lmm-r1-eval lmms_eval/tasks/mathvision/utils.py"))

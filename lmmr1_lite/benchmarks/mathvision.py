"""MathVision (MathLLMs/MathVision, split "testmini"; LMM-R1's script ran the 3,040-row "test" split).

Columns: id, question, options (a list, empty for free-form), image (a path, "images/1.jpg"),
decoded_image (the image), answer (a letter A-E for multiple choice), solution, level, subject.
Prompt: as LMM-R1's lmms-eval task (ForJadeForest/lmm-r1-eval lmms_eval/tasks/mathvision/mathvision_evals.py,
create_one_query, shot type "step-by-step"): "Question: ...", "Choices:" with "(A) text" lines, then the hint
for the answer's kind; the `<image1>` markers of the question are dropped (the image comes first in the user
turn). Cot mode adds the boxed-answer instruction.
Score (mathllm/MATH-V evaluation/evaluate.py): a multiple-choice row is right when the answer names the gold
letter or equals the gold option's text (`is_equal(gt_answer_value, model_answer)`, checked with
math-verify when not decided by text); a free-form row when the answer equals the gold answer: two plain
numbers rounded to 2 decimals as their is_equal does, anything else through math-verify.
"""
from __future__ import annotations

import re

from .base import Benchmark, Check, math_equal
from .choices import letters_for, options_dict, resolve

_IMAGE_TAG = re.compile(r"<image\d*>")


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
    def question(self, row: dict) -> str:
        text = "Question: " + _IMAGE_TAG.sub("", str(row["question"])).strip()
        options = options_dict(row.get("options"))
        if options:
            text += "\nChoices:\n" + "\n".join(f"({letter}) {option}" for letter, option in options.items())
        return f"{text}\n{hint(row)}"

    def letters(self, row: dict) -> str:
        return letters_for(len(row.get("options") or []))

    def image_refs(self, row: dict) -> list:
        return [row.get("decoded_image") or row.get("image")]

    def judge(self, row: dict, completion: str) -> bool | Check:
        predicted, gold = self.extract(row, completion), self.gold(row)
        if not predicted:
            return False
        options = options_dict(row.get("options"))
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

"""MathVista testmini (AI4Math/MathVista, split "testmini"): 1,000 visual maths questions.

Columns: pid, question, image (a path, "images/1.jpg"), decoded_image (the image), choices (a list, or None),
unit, precision (decimals of a float answer), answer, question_type ("multi_choice" / "free_form"),
answer_type ("text" / "integer" / "float" / "list"), metadata (category, context, grade, language, skills,
source, task...), query (the benchmark's own prompt: hint, question, choices).
Prompt: the `query` column in both modes (LMM-R1 ran lmms-eval's mathvista_testmini_cot, which builds the same
hint/question/choices; ForJadeForest/lmm-r1-eval miscs/lmmr1/eval_mm_benchmark.sh); cot mode adds the
boxed-answer instruction.
Score (lupantech/MathVista evaluation/calculate_score.py, normalize_extracted_answer + safe_equal; the
official extractor is GPT, ours the rule-based extract.py, with the row's unit stripped as GPT does):
- multi_choice: a letter ("B", "(B) 8/11") maps to its choice, else the choice text itself, else, for a short
  answer (GPT's extraction is a few words), the choice nearest by Levenshtein distance (get_most_similar);
  right when that choice equals `answer`; an answer naming several letters ("(A), (C)") names none;
- integer: str(int(float(x))) == answer; float: str(round(float(x), precision)) == answer (of the value
  after a final "=", as GPT extracts 56 from "x = 56");
- list: the same text, spaces ignored.
"""
from __future__ import annotations

import re

from .base import COT_INSTRUCTION, Benchmark
from .choices import letters_for, nearest, options_dict, resolve

_LEADING_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?:\D|$))")
_WRAPPED = re.compile(r"\\(?:text|mathrm|textbf|mathbf)\{([^{}]*)\}")


def number_text(extraction: str, unit: str) -> str:
    """The number in an extracted free-form answer: unit, `$`, %, degrees and thousands commas removed;
    if text still follows the number ("5 apples"), the leading number."""
    text = _WRAPPED.sub(r"\1", extraction)
    for junk in (unit, "$", "\\%", "%", "^\\circ", "^{\\circ}", "°", "\\,", "\\!"):
        text = text.replace(junk, "") if junk else text
    text = _THOUSANDS.sub("", text).strip()
    match = _LEADING_NUMBER.match(text)
    return match.group(0) if match else text


def normalise(extraction: str, row: dict) -> str | None:
    """Their normalize_extracted_answer: the prediction in the form `answer` is stored in (None: unusable)."""
    if row.get("question_type") == "multi_choice":
        options = options_dict(row.get("choices"))
        letter = resolve(extraction, options) or nearest(extraction, options)
        return options[letter] if letter else None
    kind = row.get("answer_type")
    extraction = extraction.rsplit("=", 1)[-1].strip()  # "x = 56": GPT's extraction is the value, 56
    try:
        if kind == "integer":
            return str(int(float(number_text(extraction, str(row.get("unit") or "")))))
        if kind == "float":
            value = float(number_text(extraction, str(row.get("unit") or "")))
            return str(round(value, int(row.get("precision") or 0)))
    except (ValueError, OverflowError):
        return None
    if kind == "list":
        text = "".join(extraction.split())
        return text if text.startswith("[") else f"[{text}]"
    return extraction


class MathVista(Benchmark):
    rule = ("the kit's rule-based extraction (answer phrase, the last sentence's option or value for prose), then "
            "MathVista's normalize_extracted_answer and safe_equal; the nearest choice for short answers only")
    PAPER_EVAL = ("GPT extracts the answer from the response (MathVista's extract_answer, lmms-eval's mathvista "
                  "task), then the same normalisation; ours extracts by rules, so prose it cannot read scores 0")

    def question(self, row: dict) -> str:
        if row.get("query"):
            return str(row["query"]).strip()
        text = f"Question: {str(row['question']).strip()}"  # their create_one_query when `query` is absent
        text += f" (Unit: {row['unit']})" if row.get("unit") else ""
        options = options_dict(row.get("choices"))
        if options:
            text += "\nChoices:\n" + "\n".join(f"({letter}) {choice}" for letter, choice in options.items())
        return text

    def cot_prompt(self, row: dict) -> str:
        return f"{self.question(row)}\n{COT_INSTRUCTION}"

    def letters(self, row: dict) -> str:
        return letters_for(len(row.get("choices") or [])) if row.get("question_type") == "multi_choice" else ""

    def options(self, row: dict) -> dict[str, str]:
        return options_dict(row.get("choices")) if row.get("question_type") == "multi_choice" else {}

    def image_refs(self, row: dict) -> list:
        return [row.get("decoded_image") or row.get("image")]

    def judge(self, row: dict, completion: str) -> bool:
        extraction = self.extract(row, completion)
        if not extraction or (row.get("question_type") == "multi_choice" and not row.get("choices")):
            return False
        prediction = normalise(extraction, row)
        answer = str(row["answer"]).strip()
        if row.get("answer_type") == "list":
            answer = "".join(answer.split())
        return prediction is not None and prediction.strip() == answer

    def details(self, row: dict) -> dict:
        meta = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
        return {"question_type": row.get("question_type"), "answer_type": row.get("answer_type"),
                "category": meta.get("category"), "task": meta.get("task"), "source": meta.get("source")}


BENCHMARK = MathVista(
    name="mathvista", paper_column="MathVista", modality="multimodal", hub_id="AI4Math/MathVista", split="testmini",
    required=("question", "answer", "question_type", "answer_type"), id_column="pid",
    sources=("lupantech/MathVista evaluation/calculate_score.py",
             "EvolvingLMMs-Lab/lmms-eval lmms_eval/tasks/mathvista/mathvista_evals.py"))

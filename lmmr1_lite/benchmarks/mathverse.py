"""MathVerse testmini (AI4Math/MathVerse, config "testmini", split "testmini"; lmms-eval reads the same rows
from CaraJ/MathVerse-lmmseval): 788 problems in five versions each (Text Dominant, Text Lite, Vision
Intensive, Vision Dominant, Vision Only), 3,940 rows.

Columns: sample_index, problem_index, problem_version, question, image, answer, question_type
("multi-choice" or "free-form"), metadata (split, source, subject, subfield), query_wo, query_cot,
question_for_eval (the full question, choices included, that the official judge reads).
Prompt: lmmr1 mode sends `question`, as LMM-R1's task does (ForJadeForest/lmm-r1-eval
lmms_eval/tasks/mathverse/mathverse_testmini.yaml: shot_type "format-prompt", query_type "question"), or
`query_wo` when `question` is empty (a Vision Only row carries its question in the image); cot mode sends
the benchmark's own `query_cot`.
Score: the official judge is GPT comparing the extracted answer with `answer` (ZrrSkywalker/MathVerse
evaluation/score_answer_s2.py; its prompt counts "only a complete match" for multiple choice, and the
option's text as matching its letter; lmms-eval's rule part, quick_match, is the whole response equal to
`answer`). Ours, without a language model: a multiple-choice row is right when the answer names the gold
option, by letter or by the text of that option parsed from question_for_eval; the gold option is the
letter `answer` names ("C", "(C)", "C:√{3}") or the one option whose text `answer` is; a gold naming no option,
and a free-form row, are right when math-verify finds the answer equal to `answer`. The version is in every
row's details.
"""
from __future__ import annotations

import json

from .base import Benchmark, Check, math_equal
from .choices import inline_options, resolve

VERSIONS = ("Text Dominant", "Text Lite", "Vision Intensive", "Vision Dominant", "Vision Only", "Text Only")


def metadata(row: dict) -> dict:
    """The row's metadata as a dict (parquet and JSON copies may hold it as a JSON string)."""
    meta = row.get("metadata") or {}
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            return {}
    return meta if isinstance(meta, dict) else {}


class MathVerse(Benchmark):
    rule = ("rules, no language model: multiple choice by the option the answer names (letter or option text) "
            "against the option the gold names; free form by math-verify")
    PAPER_EVAL = ("GPT extracts the answer and GPT judges it against the gold (MathVerse's score_answer_s2.py, "
                  "lmms-eval's mathverse task); the only rule there is an exact match of the extraction")

    def question(self, row: dict) -> str:
        return str(row.get("question") or "").strip() or str(row.get("query_wo") or "").strip()

    def cot_prompt(self, row: dict) -> str:
        return str(row.get("query_cot") or "").strip() or super().cot_prompt(row)

    def multiple_choice(self, row: dict) -> bool:
        return str(row.get("question_type", "")).startswith("multi")

    def letters(self, row: dict) -> str:
        return ("".join(self.options(row)) or "ABCDE") if self.multiple_choice(row) else ""

    def options(self, row: dict) -> dict[str, str]:
        return inline_options(str(row.get("question_for_eval") or row.get("question") or ""))

    def image_refs(self, row: dict) -> list:
        return [row.get("image")]

    def gold_letter(self, row: dict) -> str | None:
        """The option a multiple-choice gold names: "C", "(C)", "C:√{3}", "C. √{3}", or the text of exactly one
        option ("√{3}"); None when it names none (then the answer is compared with the gold as maths)."""
        return resolve(self.gold(row), self.options(row), self.letters(row))

    def judge(self, row: dict, completion: str) -> bool | Check:
        predicted = self.extract(row, completion)
        if self.multiple_choice(row):
            letter = self.gold_letter(row)
            if letter is not None:
                return resolve(predicted, self.options(row), self.letters(row)) == letter
        return math_equal(predicted, self.gold(row))

    def details(self, row: dict) -> dict:
        meta = metadata(row)
        return {"version": row.get("problem_version"), "question_type": row.get("question_type"),
                "subject": meta.get("subject"), "subfield": meta.get("subfield")}


BENCHMARK = MathVerse(
    name="mathverse", paper_column="MathVerse", modality="multimodal", hub_id="AI4Math/MathVerse",
    split="testmini", config="testmini", required=("question", "answer", "question_type", "problem_version"),
    id_column="sample_index",
    sources=("ZrrSkywalker/MathVerse evaluation/score_answer_s2.py",
             "EvolvingLMMs-Lab/lmms-eval lmms_eval/tasks/mathverse/mathverse_evals.py",
             "ForJadeForest/lmm-r1-eval lmms_eval/tasks/mathverse/mathverse_testmini.yaml"))

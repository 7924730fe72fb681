"""MATH-500 (HuggingFaceH4/MATH-500, split "test"): 500 competition problems, free-form answers.

Columns: problem, solution, answer, subject, level, unique_id.
Prompt (cot): the LightEval template LMM-R1 evaluated with (ForJadeForest/lmm-r1-eval evaluate_text.py,
MATH_QUERY_TEMPLATE, itself from simple-evals): think step by step, end with a boxed answer.
Score: the extracted answer against the `answer` column through math-verify (LMM-R1's LightEval metric is
math-verify on the boxed answer of `solution`, which is the `answer` column).
"""
from __future__ import annotations

from .base import Benchmark

MATH_QUERY_TEMPLATE = (
    "Solve the following math problem efficiently and clearly.  The last line of your response should be of the "
    "following format: 'Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct' (without quotes) "
    "where ANSWER is just the final number or expression that solves the problem. Think step by step before "
    "answering.\n\n{question}")


class Math500(Benchmark):
    rule = ("the kit's extraction (<answer> block, last \\boxed{}, answer phrase, the last sentence's formula or "
            "number), then math-verify equivalence with `answer`")
    PAPER_EVAL = ("LightEval's MATH-500 metric (its extractive match: math-verify's own extraction and comparison), "
                  "rule-based as ours; differences in the README's table")

    def question(self, row: dict) -> str:
        return str(row["problem"]).strip()

    def cot_prompt(self, row: dict) -> str:
        return MATH_QUERY_TEMPLATE.replace("{question}", self.question(row))

    def details(self, row: dict) -> dict:
        return {"subject": row.get("subject"), "level": row.get("level")}


BENCHMARK = Math500(
    name="math500", paper_column="MATH500", modality="text", hub_id="HuggingFaceH4/MATH-500", split="test",
    required=("problem", "answer"), id_column="unique_id",
    sources=("ForJadeForest/lmm-r1-eval evaluate_text.py",))

"""GPQA Diamond (Idavidrein/gpqa, config "gpqa_diamond", split "train"): 198 four-option science questions.

Columns used: Question, Correct Answer, Incorrect Answer 1..3 (also Record ID, Subdomain, High-level domain).
Options: as LMM-R1's LightEval task (ForJadeForest/lmm-r1-eval evaluate_text.py, gpqa_prompt_fn) the
correct answer is inserted at a random position among the three incorrect ones, which keep their order;
theirs draws it from the unseeded global `random`, ours from a generator seeded with the benchmark seed and a
digest of the question, so a row's letter order is the same in every call and process.
Prompt (cot): simple-evals' template from the same file ("Answer: $LETTER" on the last line).
Score: the extracted answer names the gold option, by letter or by the correct answer's exact text.
(idavidrein/gpqa's own code is not in the reference index; the rule follows LightEval's letter metric.)
"""
from __future__ import annotations

import random

from .base import Benchmark, stable_hash
from .choices import resolve

SEED = 0
GPQA_QUERY_TEMPLATE = (
    "Answer the following multiple choice question. The last line of your response should be of the following "
    "format: 'Answer: $LETTER' (without quotes) where LETTER is one of ABCD. Think step by step before answering."
    "\n\n{body}")


def options(row: dict, seed: int = SEED) -> tuple[dict[str, str], str]:
    """The row's four options {"A": ..., "D": ...} and the gold letter; stable for a given seed."""
    texts = [str(row[f"Incorrect Answer {i}"]).strip() for i in (1, 2, 3)]
    gold_index = random.Random(f"gpqa-{seed}-{stable_hash(str(row['Question']))}").randint(0, 3)
    texts.insert(gold_index, str(row["Correct Answer"]).strip())
    return dict(zip("ABCD", texts)), "ABCD"[gold_index]


class GPQA(Benchmark):
    rule = ("the option the extracted answer names (letter, '(B) text', 'Option B', or the correct answer's exact "
            "text); a hedge naming several letters scores 0")
    PAPER_EVAL = ("LightEval's GPQA letter extraction, rule-based; it reads a hedge as one of its letters and an "
                  "option's text as nothing (README's table); its option order is unseeded, ours seeded")

    def question(self, row: dict) -> str:
        lettered = "\n".join(f"{letter}) {text}" for letter, text in options(row)[0].items())
        return f"{str(row['Question']).strip()}\n\n{lettered}"

    def cot_prompt(self, row: dict) -> str:
        return GPQA_QUERY_TEMPLATE.replace("{body}", self.question(row))

    def gold(self, row: dict) -> str:
        return options(row)[1]

    def letters(self, row: dict) -> str:
        return "ABCD"

    def options(self, row: dict) -> dict[str, str]:
        return options(row)[0]

    def judge(self, row: dict, completion: str) -> bool:
        return resolve(self.extract(row, completion), self.options(row)) == self.gold(row)

    def details(self, row: dict) -> dict:
        return {"domain": row.get("High-level domain"), "subdomain": row.get("Subdomain")}


BENCHMARK = GPQA(
    name="gpqa_diamond", paper_column="GPQA", modality="text", hub_id="Idavidrein/gpqa", split="train",
    config="gpqa_diamond", required=("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                                     "Incorrect Answer 3"), id_column="Record ID",
    sources=("ForJadeForest/lmm-r1-eval evaluate_text.py", "huggingface/lighteval src/lighteval/tasks/tasks/gpqa.py"))

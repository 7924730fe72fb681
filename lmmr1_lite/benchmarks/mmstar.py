"""MM-Star (Lin-Chen/MMStar, split "val"): 1,500 vision-indispensable four-option questions.

Columns: index, question (options inline: "Options: A: ..., B: ..., C: ..., D: ..."), image, answer (a letter),
category (6 core capabilities), l2_category (18 axes), meta_info.
Prompt: the question, then lmms-eval's default post-prompt "Answer with the option's letter from the given
choices directly" (EvolvingLMMs-Lab/lmms-eval lmms_eval/tasks/mmstar/_default_template_yaml, the task LMM-R1
ran); cot mode replaces that line with the boxed-answer instruction, since it asks for no reasoning.
Score (MMStar-Benchmark/MMStar eval/vlmeval/evaluate/mmstar.py): the official rule reads the letter at the
start of the prediction, also after "(", "option " or "the answer is "; ours reads the same letters from the
extracted answer (resolve: "B", "(B)", "B. text", "Option B") and also accepts the text of exactly one option.
Category and l2_category are in every row's details (the official score averages the categories).
"""
from __future__ import annotations

from .base import Benchmark
from .choices import inline_options, resolve

POST_PROMPT = "\nAnswer with the option's letter from the given choices directly"


class MMStar(Benchmark):
    rule = ("the option letter the answer names ('B', '(B)', 'B. text', 'Option B', the text of exactly one "
            "option); a hedge naming several letters scores 0")
    PAPER_EVAL = ("lmms-eval's mmstar task reads a letter by rules (a hedge reads as one of its letters); "
                  "MM-Star's own VLMEvalKit evaluation asks a GPT model when no letter is found")

    def question(self, row: dict) -> str:
        return f"{str(row['question']).strip()}{POST_PROMPT}"

    def cot_prompt(self, row: dict) -> str:
        return f"{str(row['question']).strip()}\nPlease reason step by step, and put the letter of your final choice " \
               "within \\boxed{}."

    def letters(self, row: dict) -> str:
        return "".join(self.options(row)) or "ABCD"

    def options(self, row: dict) -> dict[str, str]:
        return inline_options(str(row["question"]))

    def image_refs(self, row: dict) -> list:
        return [row.get("image")]

    def judge(self, row: dict, completion: str) -> bool:
        return resolve(self.extract(row, completion), self.options(row), self.letters(row)) == self.gold(row).upper()

    def details(self, row: dict) -> dict:
        return {"category": row.get("category"), "l2_category": row.get("l2_category")}


BENCHMARK = MMStar(
    name="mmstar", paper_column="MM-Star", modality="multimodal", hub_id="Lin-Chen/MMStar", split="val",
    required=("question", "answer"), id_column="index",
    sources=("MMStar-Benchmark/MMStar eval/vlmeval/evaluate/mmstar.py",
             "EvolvingLMMs-Lab/lmms-eval lmms_eval/tasks/mmstar/_default_template_yaml"))

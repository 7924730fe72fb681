"""What every benchmark shares: prompts in two modes, examples, extraction and batched scoring.

A benchmark module subclasses `Benchmark` and overrides a few hooks: `question` (the prompt body, with
options), `cot_prompt` (its own chain-of-thought prompt, when the benchmark has one), `gold`, `letters`
(for multiple-choice rows), `image_refs`, `details` and `judge`. `judge` returns True/False when the rule
decides alone, or a `Check`: pairs for the math-verify pool plus how to combine their verdicts, so that
`score_batch` sends the checks of a whole batch through one `verifier.pool().check` call.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from .. import verifier
from ..config import LMM_R1_SYSTEM_PROMPT, ConfigError
from ..data import Example
from ..rewards import _quick_verdict
from .extract import extract_answer
from .images import LazyImages, present

# lmmr1: LMM-R1's system prompt, the bare question; cot: the benchmark's chain-of-thought prompt, no system
# prompt; run: the bare question under a training run's own system prompt and template (set by the caller)
MODES = ("lmmr1", "cot", "run")
# Qwen2.5's maths chain-of-thought instruction, used in cot mode by benchmarks without their own CoT prompt.
COT_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


def every(verdicts: list[bool]) -> bool:
    """All checks passed, and there was at least one."""
    return bool(verdicts) and all(verdicts)


@dataclass
class Check:
    """Answer pairs `(predicted, gold)` for the verifier, and how their verdicts make the row's verdict."""
    pairs: list[tuple[str, str]]
    combine: Callable[[list[bool]], bool] = every


def math_equal(predicted: str | None, gold: str) -> bool | Check:
    """Maths equivalence: plain numbers and words decided here, anything else by math-verify in the pool."""
    if not predicted:
        return False
    verdict = _quick_verdict(predicted, gold)
    return Check([(predicted, gold)]) if verdict is None else verdict


def stable_hash(text: str) -> str:
    """A short digest that is the same in every process (Python's hash() is salted per process)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class Benchmark:
    name: str
    paper_column: str                    # the Table 1 column this benchmark fills
    modality: str                        # "text" or "multimodal"
    hub_id: str | None                   # where `datasets.load_dataset` finds it
    split: str
    config: str | None = None
    required: tuple[str, ...] = ()       # columns every published row has (checked by load_rows)
    id_column: str | None = None
    sources: tuple[str, ...] = field(default=())  # the official code the rules follow (repo path)
    # The rules a benchmark can score by (`eval --scoring NAME=RULE`): rule name -> attributes it sets; the
    # first is the default. `rule` says in words what the current one does, `PAPER_EVAL` how the paper's
    # evaluation of this benchmark differs (eval.md prints both).
    SCORINGS: ClassVar[dict[str, dict]] = {}
    PAPER_EVAL: ClassVar[str] = ""
    rule: ClassVar[str] = ""

    @property
    def scoring(self) -> str:
        """The name of the rule in use ("" when the benchmark has one rule only)."""
        return next((name for name, attributes in self.SCORINGS.items()
                     if all(getattr(self, key) == value for key, value in attributes.items())), "")

    def use_scoring(self, name: str) -> None:
        """Score by the rule `name` (one of SCORINGS); ConfigError (one line) naming the choices otherwise."""
        if name not in self.SCORINGS:
            choices = ", ".join(self.SCORINGS) or "none: it has one rule"
            raise ConfigError(f"--scoring {self.name}={name}: {self.name} scores by {choices}")
        for key, value in self.SCORINGS[name].items():
            setattr(self, key, value)

    # ----- hooks a benchmark overrides ------------------------------------------------------------
    def question(self, row: dict) -> str:
        """The prompt body shared by both modes: the question with its options and answer-type hints."""
        raise NotImplementedError

    def cot_prompt(self, row: dict) -> str:
        """The cot-mode prompt: the benchmark's own CoT query where it has one, else question + instruction."""
        return f"{self.question(row)}\n{COT_INSTRUCTION}"

    def gold(self, row: dict) -> str:
        return str(row["answer"]).strip()

    def letters(self, row: dict) -> str:
        """Option letters of a multiple-choice row ("" for a free-form row)."""
        return ""

    def options(self, row: dict) -> dict[str, str]:
        """Option texts by letter of a multiple-choice row ({} for a free-form row, or when unknown)."""
        return {}

    def image_refs(self, row: dict) -> list:
        return []

    def details(self, row: dict) -> dict:
        """Fields for per-category breakdowns (category, version, subject...)."""
        return {}

    def judge(self, row: dict, completion: str) -> bool | Check:
        """The benchmark's rule for one completion (default: maths equivalence with the gold answer)."""
        return math_equal(self.extract(row, completion), self.gold(row))

    def missing(self, row: dict) -> str | None:
        """The first required column a row lacks (None when complete); load_rows names it."""
        return next((column for column in self.required if column not in row or row[column] is None), None)

    # ----- shared API ------------------------------------------------------------------------------
    def row_id(self, row: dict) -> str:
        if self.id_column and row.get(self.id_column) not in (None, ""):
            return str(row[self.id_column])
        return stable_hash(json.dumps(self.question(row), ensure_ascii=False))

    def prompt(self, row: dict, mode: str) -> str:
        if mode not in MODES:
            raise ConfigError(f"benchmark mode {mode!r}: expected one of {', '.join(MODES)}")
        return self.cot_prompt(row) if mode == "cot" else self.question(row)

    def to_example(self, row: dict, mode: str = "cot", base_dir: str | Path = ".") -> Example:
        """An Example for generation: prompt text, gold answer, lazily decoded images, and the system
        prompt of the mode (LMM-R1's in lmmr1 mode; "" in cot mode; None in run mode, whose caller wraps the
        question in the run's own system prompt and template when it builds the messages)."""
        prompt = self.prompt(row, mode)
        images = LazyImages([ref for ref in self.image_refs(row) if present(ref)], base_dir)
        meta = {"row": row, "benchmark": self.name, "mode": mode, "id": self.row_id(row), **self.details(row)}
        system = {"lmmr1": LMM_R1_SYSTEM_PROMPT, "cot": ""}.get(mode)  # None: the caller's (run mode)
        return Example(prompt=prompt, answer=self.gold(row), images=images, system=system, meta=meta)

    def extract(self, row: dict, completion: str) -> str | None:
        """The answer read from a completion (what the predictions JSONL records)."""
        return extract_answer(completion, self.letters(row), self.options(row))

    def score(self, row: dict, completion: str) -> float:
        return self.score_batch([row], [completion])[0]

    def score_batch(self, rows: list[dict], completions: list[str]) -> list[float]:
        """1.0/0.0 per (row, completion); every verifier check of the batch goes through one pool call."""
        if len(rows) != len(completions):
            raise ValueError(f"score_batch: {len(rows)} rows but {len(completions)} completions")
        verdicts = [self.judge(row, completion) for row, completion in zip(rows, completions)]
        pairs = [pair for v in verdicts if isinstance(v, Check) for pair in v.pairs]
        checked = iter(verifier.pool().check(pairs) if pairs else [])
        scores = []
        for verdict in verdicts:
            if isinstance(verdict, Check):
                verdict = verdict.combine([next(checked)[0] for _ in verdict.pairs])
            scores.append(1.0 if verdict else 0.0)
        return scores

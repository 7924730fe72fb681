"""Rule-based rewards. Each reward maps (completion text, gold answer) to a float; the total
reward of a completion is the config's weighted sum of named rewards.

A model's output is hostile input: nothing from a completion is ever evaluated as code, and
an answer check that raises or runs out of time scores 0 (and is counted), never 1.
"""
from __future__ import annotations

import re
from typing import Callable

from .config import ConfigError

RewardFn = Callable[[str, str], float]
REWARDS: dict[str, RewardFn] = {}


def reward(name: str):
    """Register a reward under `name`, so a config can weight it: `rewards: {name: 0.5}`."""
    def register(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn
    return register


# LMM-R1's format: the whole response is <think>...</think><answer>...</answer>, one of each,
# nothing between the two blocks. Surrounding whitespace is tolerated (tokenizers add it).
FORMAT_RE = re.compile(r"^\s*<think>((?!</think>).)*</think>\s*<answer>((?!</answer>).)*</answer>\s*$", re.DOTALL)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(completion: str) -> str | None:
    """The text inside the last <answer>...</answer>, else None. Text in <think> never counts."""
    found = ANSWER_RE.findall(completion)
    return found[-1].strip() if found else None


@reward("format")
def format_reward(completion: str, answer: str = "") -> float:
    ok = FORMAT_RE.match(completion) is not None and all(completion.count(t) == 1 for t in TAGS)
    return 1.0 if ok and extract_answer(completion) else 0.0


@reward("tags")
def tag_reward(completion: str, answer: str = "") -> float:
    """Partial format credit for a policy that starts from random weights: 1/4 for each tag
    that appears exactly once and after the previous tag. Dense from step one, and it tops
    out exactly where `format` starts paying; the real configs do not use it."""
    score, position = 0.0, 0
    for tag in TAGS:
        found = completion.find(tag, position)
        if found < 0 or completion.count(tag) != 1:
            break
        score, position = score + 0.25, found + len(tag)
    return score


def _normalise(text: str) -> str:
    text = text.strip().strip("$").strip()
    boxed = re.fullmatch(r"\\boxed\{(.*)\}", text)
    return (boxed.group(1) if boxed else text).replace(" ", "")


@reward("accuracy")
def accuracy_reward(completion: str, answer: str) -> float:
    """1.0 when the answer inside <answer> equals the gold answer, as text or (math-verify) as math."""
    predicted = extract_answer(completion)
    if not predicted:
        return 0.0
    pred, gold = _normalise(predicted), _normalise(answer)
    if pred == gold:
        return 1.0
    if _PLAIN.fullmatch(pred) and _PLAIN.fullmatch(gold):  # plain numbers or words: no parser needed
        if pred[0].isalpha() or gold[0].isalpha():
            return 1.0 if pred.lower() == gold.lower() else 0.0
        return 1.0 if float(pred) == float(gold) else 0.0
    return 1.0 if _math_equal(predicted, answer) else 0.0


_PLAIN = re.compile(r"[A-Za-z]+|[-+]?\d+(\.\d+)?")


def _math_equal(predicted: str, gold: str) -> bool:
    from math_verify import parse, verify

    try:
        gold_parsed = parse(gold if "$" in gold else f"${gold}$", parsing_timeout=1)
        pred_parsed = parse(predicted if "$" in predicted else f"${predicted}$", parsing_timeout=1)
        return bool(gold_parsed and pred_parsed and verify(gold_parsed, pred_parsed, timeout_seconds=1))
    except Exception:  # hostile or malformed text: a failed check pays nothing
        return False


def check_names(names) -> None:
    unknown = [name for name in names if name not in REWARDS]
    if unknown:
        raise ConfigError(f"rewards: unknown reward(s) {unknown}; registered: {sorted(REWARDS)}")


def score(completions: list[str], answers: list[str], weights: dict[str, float],
          report: tuple[str, ...] = ("format", "accuracy")) -> tuple[list[float], dict]:
    """Total reward per completion and each component's values: `(totals, {name: [values]})`.

    The rewards named in `report` are computed for the metrics even when not weighted."""
    names = list(weights) + [name for name in report if name not in weights]
    check_names(names)
    components = {name: [REWARDS[name](c, a) for c, a in zip(completions, answers)] for name in names}
    totals = [sum(weights[name] * components[name][i] for name in weights) for i in range(len(completions))]
    return totals, components

"""Rule-based rewards. A reward sees a batch and the examples it scores, as TRL's reward functions see
the dataset's columns: `fn(completions: list[str], examples: list[Example]) -> list[float]` (one
example per completion, and by keyword any step columns it registered, e.g. `completion_lengths`: its prompt, gold answer, images and `meta`, e.g. a Sokoban level). The total
reward of a completion is the config's weighted sum of named rewards.

A model's output is hostile input: nothing from a completion is ever evaluated as code, and
an answer check that raises or runs out of time scores 0 (and is counted), never 1.
"""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Callable

from . import verifier
from .answers import extract_answer, last_boxed  # noqa: F401  (re-exported: the rewards' reading of an answer)
from .config import ConfigError

RewardFn = Callable[..., list]  # (completions: list[str], examples: list[Example], **columns) -> list[float]
REWARDS: dict[str, RewardFn] = {}
REWARD_COLUMNS: dict[str, tuple[str, ...]] = {}  # reward name -> the keyword columns `score` must pass it
TASK_REWARDS = ("accuracy", "sokoban")  # rewards that say whether the task was solved (eval's "accuracy")


def reward(name: str, columns: tuple[str, ...] = ()):
    """Register a batched reward under `name`, so a config can weight it: `rewards: {name: 0.5}`. `columns`
    names what else it reads besides the texts and examples (e.g. `completion_lengths`), passed by keyword
    as TRL passes a reward function its extra columns."""
    def register(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        REWARD_COLUMNS[name] = tuple(columns)
        return fn
    return register


# LMM-R1's format: the whole response is <think>...</think><answer>...</answer>, one of each,
# nothing between the two blocks. Surrounding whitespace is tolerated (tokenizers add it).
FORMAT_RE = re.compile(r"^\s*<think>((?!</think>).)*</think>\s*<answer>((?!</answer>).)*</answer>\s*$", re.DOTALL)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")
# the one \boxed{} ends the completion; math delimiters or bold closing it ("$\boxed{5}$.", "\(\boxed{5}\)") allowed
BOXED_FORMAT_RE = re.compile(r"^(?:(?!\\boxed\{).)*\\boxed\{.+\}\s*(?:\$\$?|\\\)|\\\]|\*\*)?\s*(?:\.\s*)?$", re.DOTALL)


def task_reward(weights: dict) -> str:
    """The reward that measures success for a run's configured rewards: sokoban when weighted, else accuracy."""
    return next((name for name in TASK_REWARDS if name in weights), "accuracy")


def format_reward(completion: str, answer: str = "") -> float:
    """LMM-R1's template: <think>...</think><answer>...</answer>, one of each, in order, answer non-empty."""
    ok = FORMAT_RE.match(completion) is not None and all(completion.count(t) == 1 for t in TAGS)
    return 1.0 if ok and extract_answer(completion) else 0.0


def boxed_format_reward(completion: str, answer: str = "") -> float:
    """`\\boxed{}` style: free reasoning ending in exactly one non-empty `\\boxed{...}`."""
    ok = BOXED_FORMAT_RE.match(completion) is not None and completion.count("\\boxed{") == 1
    return 1.0 if ok and last_boxed(completion) else 0.0


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
    return text.replace(" ", "")


_PLAIN = re.compile(r"[A-Za-z]+|[-+]?\d+(\.\d+)?")


def _quick_verdict(predicted: str, gold: str) -> bool | None:
    """Equal / not equal for plain numbers and words without a parser; None when math is needed."""
    pred, ref = _normalise(predicted), _normalise(gold)
    if pred == ref:
        return True
    if max(len(pred), len(ref)) > verifier.MAX_ANSWER_CHARS:
        return None  # the verifier rejects it unparsed, and counts it
    if _PLAIN.fullmatch(pred) and _PLAIN.fullmatch(ref):
        if pred[0].isalpha() or ref[0].isalpha():
            return pred.lower() == ref.lower()
        return Fraction(pred) == Fraction(ref)  # exact: two different 400-digit numbers are not both "inf"
    return None


def accuracy_batch(completions: list[str], answers: list[str]) -> list[float]:
    """Accuracy of many completions: quick verdicts inline, the rest through the verifier pool in parallel."""
    scores = [0.0] * len(completions)
    todo = []
    for i, (completion, gold) in enumerate(zip(completions, answers)):
        predicted = extract_answer(completion)
        if not predicted:
            continue
        verdict = _quick_verdict(predicted, gold)
        if verdict is None:
            todo.append((i, predicted))
        else:
            scores[i] = float(verdict)
    if todo:
        checked = verifier.pool().check([(predicted, answers[i]) for i, predicted in todo])
        for (i, _predicted), (equal, _status) in zip(todo, checked):
            scores[i] = float(equal)
    return scores


def gold_parseable(examples: list) -> list[bool]:
    """Whether each example's gold can be checked at all: a Sokoban level, a plain answer, or one that
    math-verify parses."""
    ok = [bool(e.meta.get("level")) or bool(_PLAIN.fullmatch(_normalise(e.answer))) for e in examples]
    todo = [i for i, good in enumerate(ok) if not good]
    if todo:
        checked = verifier.pool().check([(examples[i].answer, examples[i].answer) for i in todo])
        for i, (equal, _status) in zip(todo, checked):
            ok[i] = equal
    return ok


def accuracy_reward(completion: str, answer: str) -> float:
    """1.0 when the answer inside <answer> (else the last `\\boxed{}`) equals the gold answer, as text
    or, through math-verify in a time-limited worker, as math; else 0.0 (also on timeout or error)."""
    return accuracy_batch([completion], [answer])[0]


def _each(fn) -> RewardFn:
    """A batched reward from a per-completion one that needs only the completion text."""
    return lambda completions, examples: [fn(c) for c in completions]


def soft_overlong_punishment(completion_lengths: list[int], max_completion_len: int,
                             soft_punish_cache: int) -> list[float]:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, eq. 13), TRL's
    `get_soft_overlong_punishment`: 0 up to `max_completion_len - soft_punish_cache` tokens, then
    linear down to -1 at `max_completion_len`, -1 beyond it. Lengths count the stop token."""
    start = max_completion_len - soft_punish_cache
    return [0.0 if n <= start else -1.0 if n > max_completion_len else (start - n) / soft_punish_cache
            for n in completion_lengths]


reward("format")(_each(format_reward))
reward("format_boxed")(_each(boxed_format_reward))
reward("tags")(_each(tag_reward))
reward("accuracy")(lambda completions, examples: accuracy_batch(completions, [e.answer for e in examples]))
reward("soft_overlong", columns=("completion_lengths", "max_completion_len", "soft_punish_cache"))(
    lambda completions, examples, **columns: soft_overlong_punishment(**columns))


def check_names(names) -> None:
    unknown = [name for name in names if name not in REWARDS]
    if unknown:
        raise ConfigError(f"rewards: unknown reward(s) {unknown}; registered: {sorted(REWARDS)}")


def score(completions: list[str], examples: list, weights: dict[str, float],
          report: tuple[str, ...] = ("format", "accuracy"), **columns) -> tuple[list[float], dict, dict]:
    """Total reward per completion, each component's values, and this call's verifier counts:
    `(totals, {name: [values]}, {"reward_timeouts": n, "reward_errors": n, "reward_rejected": n})`.
    `examples[i]` is the example completion i answers.

    The rewards named in `report` are computed for the metrics even when not weighted. A reward that
    raises (a user's, on odd output) pays 0 for the batch and is counted as errors; so does one that
    returns the wrong number of values. `columns` holds what rewards registered with `columns` read
    (the training step passes `completion_lengths`, `max_completion_len` and `soft_punish_cache`)."""
    names = list(weights) + [name for name in report if name not in weights]
    check_names(names)
    stats = verifier.pool().stats
    before = (stats.timeouts, stats.errors, stats.rejected)
    components, raised = {}, 0
    for name in names:
        wanted = {key: columns[key] for key in REWARD_COLUMNS.get(name, ())}  # a missing column: a bug, raised
        try:
            values = [float(v) for v in REWARDS[name](completions, examples, **wanted)]
            if len(values) != len(completions):
                raise ValueError(f"reward {name!r} returned {len(values)} values for {len(completions)} completions")
        except Exception:  # noqa: BLE001 - a reward that raises pays 0, counted
            values, raised = [0.0] * len(completions), raised + len(completions)
        components[name] = values
    totals = [sum(weights[name] * components[name][i] for name in weights) for i in range(len(completions))]
    after = (stats.timeouts, stats.errors, stats.rejected)
    counts = {key: a - b for key, a, b in zip(("reward_timeouts", "reward_errors", "reward_rejected"), after, before)}
    counts["reward_errors"] += raised
    return totals, components, counts


from .sokoban import sokoban_rewards  # noqa: E402  (a simulator reward, registered like the others)

reward("sokoban")(sokoban_rewards)

"""Answer extraction for benchmark completions, serving both prompt modes in linear time.

Order (first that yields text wins):
1. the last `<answer>...</answer>` block (lmmr1 mode); a `\\boxed{}` inside it wins over the rest of it, then
   an answer phrase inside it ("<answer>The answer is B</answer>");
2. the last `\\boxed{...}` anywhere (cot mode, and lmmr1 completions that lost their tags);
3. the text after the last "answer is" / "answer:" / "answer should be" ("the answer is 5.",
   "Final answer: 5", "final answer is: B", GPQA's "Answer: B"), up to the end of that sentence;
4. for multiple-choice rows only, an option letter ending the completion ("... so D.", "(B)"), leading
   its last line ("B. 2") or forming its first line.

A completion is hostile input: every step is `str.rfind`/`str.find` plus scans bounded by a constant,
never a regex over the whole text, so '<answer>' * 50000 or a million untagged characters return at once.
"""
from __future__ import annotations

import re

from ..answers import answer_block, last_boxed
from ..verifier import MAX_ANSWER_CHARS

# Phrases after which official extractors read the answer: MathVision's evaluate.py tries "the final answer
# is", "the answer is", "the correct answer is", "the answer should be" (mathllm/MATH-V evaluation/evaluate.py);
# OlympiadBench reads after "So the final answer is" (OpenBMB/OlympiadBench inference/judge.py); simple-evals'
# GPQA template asks for "Answer: $LETTER" (ForJadeForest/lmm-r1-eval evaluate_text.py).
PHRASES = ("answer is", "answer:", "answer should be")
TAIL_CHARS = 300  # how far before the end a closing option letter is looked for
_LETTER_TAIL = re.compile(r"(?:^|[\s(*])\(?([A-J])\)?[\s.*)]*$")     # "... so D." / "(B)"
_LETTER_LEAD = re.compile(r"\(?([A-J])(?:\)|\.|:)(?:\s|$)")             # a last line "B. 2" / "(B) 2"
_LETTER_FIRST = re.compile(r"\(?([A-J])\)?\.?[ \t]*(?:\n|$)")            # a first line "B" (MATH-V's startswith)


def clean(answer: str) -> str:
    """Trim what wraps an answer but is not part of it: spaces, `$`, markdown `**`, quotes, a final full stop."""
    text = answer.strip()
    for _ in range(3):  # wrappers nest at most a few levels ("**$5$**.")
        text = text.strip().strip("*").strip().rstrip(".").strip().strip("$").strip().strip("\"'`")
        if text.startswith("\\(") and text.endswith("\\)"):
            text = text[2:-2]
    return text.strip()


def after_phrase(text: str) -> str | None:
    """The sentence after the last answer phrase ("Therefore the answer is $5$." -> "5"), else None."""
    low = text.lower()
    position, phrase = max((low.rfind(p), p) for p in PHRASES)
    if position < 0:
        return None
    tail = text[position + len(phrase): position + len(phrase) + MAX_ANSWER_CHARS].lstrip(" \t:*")
    line = tail.split("\n", 1)[0]
    sentence_end = line.find(". ")
    if sentence_end > 0:
        line = line[:sentence_end]
    return clean(line) or None


def final_letter(text: str, letters: str) -> str | None:
    """An option letter, one of `letters`, that ends the completion ("... so the choice is D.", "(B)"),
    leads its last line ("B. 2") or is its whole first line (mathllm/MATH-V evaluation/evaluate.py tests
    `endswith(f" {c}.")`, `startswith(f"{c}\\n")` and the like)."""
    tail = text[-TAIL_CHARS:].rstrip()
    last_line = tail.rsplit("\n", 1)[-1].strip().strip("*").strip()
    first_line = text[:TAIL_CHARS].lstrip()
    for match in (_LETTER_TAIL.search(tail), _LETTER_LEAD.match(last_line), _LETTER_FIRST.match(first_line)):
        if match and match.group(1) in letters:
            return match.group(1)
    return None


def extract_answer(completion: str, letters: str = "") -> str | None:
    """The answer text of a completion (see the module docstring for the order); None when there is none.

    `letters` are the option letters of a multiple-choice row (e.g. "ABCD"); they enable rule 4."""
    if not isinstance(completion, str) or not completion:
        return None
    block = answer_block(completion)
    if block is not None:
        inner = last_boxed(block)
        found = clean(inner) if inner is not None else after_phrase(block) or clean(block)
        return found or None
    boxed = last_boxed(completion)
    if boxed is not None and clean(boxed):
        return clean(boxed)
    phrase = after_phrase(completion)
    if phrase:
        return phrase
    return final_letter(completion, letters) if letters else None


def all_boxed(text: str, limit: int = 20) -> list[str]:
    """Contents of up to `limit` `\\boxed{...}` in `text`, in order, each scanned at most MAX_ANSWER_CHARS
    characters (OlympiadBench joins every boxed answer of a completion: its math_judger.preprocess)."""
    found, end = [], len(text)
    while len(found) < limit:
        start = text.rfind("\\boxed{", 0, end)
        if start < 0:
            break
        inner = last_boxed(text[start: min(end, start + len("\\boxed{") + MAX_ANSWER_CHARS)])
        if inner is not None:
            found.append(inner)
        end = start
    return found[::-1]

"""Reading the answer out of a completion: linear-time scans shared by the training rewards, the Sokoban
simulator reward and the benchmarks' extraction. A completion is hostile input and these run in the
training process, outside the verifier's time limit, so no regex here may backtrack over the whole text.
"""
from __future__ import annotations

import itertools
import operator


_BRACE_DEPTH = {"{": 1, "}": -1}
_CHUNK = 4096


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the `}` that closes the `{` at `start`, else None. Linear, and fast where it matters:
    a chunk whose closing braces cannot bring the depth to zero is skipped with two C-level counts; the
    others are scanned by itertools in C (no per-character Python loop, even on a megabyte of braces)."""
    depth = 1
    for offset in range(start + 1, len(text), _CHUNK):
        chunk = text[offset: offset + _CHUNK]
        closes = chunk.count("}")
        if closes >= depth:  # the depth may reach zero in this chunk: find where
            running = itertools.accumulate(map(_BRACE_DEPTH.get, chunk, itertools.repeat(0)), initial=depth)
            try:
                return offset + operator.indexOf(running, 0) - 1
            except ValueError:
                pass
        depth += chunk.count("{") - closes
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` with balanced braces, else None (unbalanced: None)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    end = _closing_brace(text, start + len("\\boxed"))
    return None if end is None else text[start + len("\\boxed{"): end].strip()


def answer_block(text: str) -> str | None:
    """What `ANSWER_RE.findall(text)[-1]` is (None where it finds nothing), in linear time: the regex
    retries from every unclosed `<answer>`, quadratic in them (20,000 of them: 12 s)."""
    inner, position = None, 0
    while (opening := text.find("<answer>", position)) >= 0:
        closing = text.find("</answer>", opening + len("<answer>"))
        if closing < 0:  # no later <answer> can be closed either
            break
        inner, position = text[opening + len("<answer>"): closing], closing + len("</answer>")
    return inner


def outside_think(text: str) -> str:
    """`text` without its <think> blocks (an unclosed one runs to the end), like
    `re.sub(r"<think>.*?(</think>|$)", "", text, flags=re.DOTALL)`, in linear time."""
    pieces, position = [], 0
    while (opening := text.find("<think>", position)) >= 0:
        pieces.append(text[position:opening])
        closing = text.find("</think>", opening + len("<think>"))
        if closing < 0:  # `$` matches before a final newline, which then stays
            position = len(text) - 1 if text.endswith("\n") and len(text) - 1 >= opening + len("<think>") else len(text)
            break
        position = closing + len("</think>")
    pieces.append(text[position:])
    return "".join(pieces)


def extract_answer(completion: str) -> str | None:
    """The text inside the last <answer>...</answer> (a `\\boxed{}` inside it wins), else the last
    `\\boxed{}` outside any tag, else None. Text inside <think> never counts. Linear time: a completion is
    hostile input, and this runs in the training process, outside the verifier's time limit."""
    found = answer_block(completion)
    if found is not None:
        inner = found.strip()
        return last_boxed(inner) or inner
    return last_boxed(outside_think(completion))

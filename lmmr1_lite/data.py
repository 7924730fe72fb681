"""Prompts and gold answers: generated tasks and JSONL files, and the chat messages built from them."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError


@dataclass
class Example:
    prompt: str
    answer: str
    images: list = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Generated tasks. Each returns (train, test) lists, deterministic for a seed, with the test
# split held out by construction (no test prompt appears in train).
# ---------------------------------------------------------------------------------------------
def tiny_max(train_size: int, test_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """`max(a,b)` over digits: a comparison whose answer is one token of the tiny vocabulary.

    The 100 ordered digit pairs are split 80/20 by `seed`; train rows sample the 80 with
    replacement, test rows are the held-out 20 (cycled up to `test_size`)."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(pairs)
    held_out, seen = pairs[:20], pairs[20:]
    make = lambda a, b: Example(prompt=f"max({a},{b})", answer=str(max(a, b)))  # noqa: E731
    rng = random.Random(seed + 1)
    train = [make(*rng.choice(seen)) for _ in range(train_size)]
    test = [make(*held_out[i % len(held_out)]) for i in range(test_size)]
    return train, test


def tiny_compare(train_size: int, test_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """`a<b?` over digits, answered `yes` or `no`; pairs split 80/20 by `seed` like `tiny_max`."""
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(seed).shuffle(pairs)
    held_out, seen = pairs[:20], pairs[20:]
    make = lambda a, b: Example(prompt=f"{a}<{b}?", answer="yes" if a < b else "no")  # noqa: E731
    rng = random.Random(seed + 1)
    train = [make(*rng.choice(seen)) for _ in range(train_size)]
    test = [make(*held_out[i % len(held_out)]) for i in range(test_size)]
    return train, test


TASKS = {"tiny_max": tiny_max, "tiny_compare": tiny_compare}


def load_jsonl(path: str | Path) -> list[Example]:
    """Plain `{"prompt", "answer", "images"?}` JSONL; errors name the file, row and field."""
    path = Path(path)
    rows = []
    with path.open() as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
            for key in ("prompt", "answer"):
                if not isinstance(row.get(key), str) or not row[key].strip():
                    raise ConfigError(f"{path}:{line_no}: field {key!r} missing or not a non-empty string")
            rows.append(Example(prompt=row["prompt"], answer=row["answer"], images=list(row.get("images") or [])))
    if not rows:
        raise ConfigError(f"{path}: no rows")
    return rows


def load_splits(data: str, train_size: int, test_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """A task name gives generated train/test splits; a JSONL file is split 90/10 (test capped at test_size)."""
    if data in TASKS:
        return TASKS[data](train_size, test_size, seed)
    if not Path(data).exists():
        raise ConfigError(f"data: {data!r} is neither a task ({', '.join(TASKS)}) nor an existing file")
    rows = load_jsonl(data)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = min(test_size, len(rows) // 10)
    return [rows[i] for i in order[n_test:]], [rows[i] for i in order[:n_test]]


def build_messages(example: Example, system_prompt: str = "") -> list[dict]:
    """OpenAI-style chat messages: optional system turn, then the user turn (images first, then text)."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    if example.images:
        content = [{"type": "image", "image": image} for image in example.images]
        content.append({"type": "text", "text": example.prompt})
        messages.append({"role": "user", "content": content})
    else:
        messages.append({"role": "user", "content": example.prompt})
    return messages

"""One training or evaluation example: what a reward sees (prompt, gold answer, images, system prompt and
whatever else the row carries in `meta`, e.g. a Sokoban level). Its own module so that the data loaders,
the task generators and the rewards all use it without importing each other."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Example:
    prompt: str
    answer: str
    images: list = field(default_factory=list)  # PIL images or `ImageRef`s (build_messages gives PIL images)
    system: str | None = None                   # the row's own system prompt (LMM-R1 rows may carry one)
    meta: dict = field(default_factory=dict)

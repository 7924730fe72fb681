"""Sokoban (the paper's agent column): this project's simulator (lmmr1_lite/sokoban.py) on levels in rows.

A row carries its level as text, rows joined by "/" or newlines (`{"level": "#####/#@$.#/#####"}`), or, as
LMM-R1's Sokoban rows do, an `env_path` to a level file (read by `load_rows`, relative to the data file's
folder, into the row's `level`). LMM-R1's level files and its exact Sokoban prompt are not in the reference
index: the file is taken to be the level's text, and the instruction below is ours, in LMM-R1's style (the
rendered board as the image, the moves left/right/up/down as the answer).
Score: 1.0 when the moves of the extracted answer leave every box on a target within the first 50 moves
(sokoban.play; LMM-R1 plays the first 50 actions); any word that is not a move makes the answer invalid.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from .. import sokoban as game
from .base import Benchmark

MAX_ANSWER = 2000  # characters; a longer "move list" is not read (as sokoban.sokoban_reward)

INSTRUCTION = ("The image shows a Sokoban puzzle. You are the blue circle, grey cells are walls, brown squares are "
               "boxes and green circles are targets. You can move left, right, up or down, and you push a box by "
               "walking into it (you cannot pull). Push every box onto a target. Give your answer as the sequence "
               "of moves, separated by commas, e.g. right, right, up.")


def level_text(row: dict) -> str:
    """The row's level with rows joined by "/" and padded with floor to one width (render needs a rectangle)."""
    level = row.get("level")
    if not level and row.get("env_path"):
        level = Path(row["env_path"]).read_text()
    rows = str(level or "").strip("\n").replace("\n", "/").split("/")
    width = max(len(r) for r in rows)
    return "/".join(r.ljust(width) for r in rows)


class Sokoban(Benchmark):
    rule = "this project's simulator: the answer's moves, played on the level, solve it"
    PAPER_EVAL = "LMM-R1's Sokoban success rate, with their own levels and simulator"

    def question(self, row: dict) -> str:
        return INSTRUCTION

    def cot_prompt(self, row: dict) -> str:
        return f"{INSTRUCTION}\nPlease reason step by step, and put your final answer (the moves) within \\boxed{{}}."

    def gold(self, row: dict) -> str:
        """A reference solution when the row has one; the level itself is the gold (`to_example` puts it in
        `meta["level"]`, where the training `sokoban` reward reads it)."""
        return str(row.get("solution") or "")

    def to_example(self, row: dict, mode: str = "cot", base_dir: str | Path = "."):
        example = super().to_example(row, mode, base_dir)
        example.meta["level"] = level_text(row)
        return example

    def image_refs(self, row: dict) -> list:
        return [game.render(level_text(row))]

    def missing(self, row: dict) -> str | None:
        return None if row.get("level") or row.get("env_path") else "level (or env_path)"

    def row_id(self, row: dict) -> str:
        return str(row.get("id") or super().row_id({"level": level_text(row)}))

    def judge(self, row: dict, completion: str) -> bool:
        answer = self.extract(row, completion)
        moves = game.parse_moves(answer.replace("\\text", " ")) if answer and len(answer) < MAX_ANSWER else None
        try:
            return bool(moves) and game.play(level_text(row), moves)
        except ValueError:  # a malformed level scores 0 rather than stopping an evaluation
            return False

    def details(self, row: dict) -> dict:
        level = level_text(row)
        return {"boxes": level.count("$") + level.count("*"), "size": f"{len(level.split('/'))}x{level.find('/')}"}


BENCHMARK = Sokoban(name="sokoban", paper_column="Sokoban", modality="multimodal", hub_id=None, split="test",
                    sources=("lmmr1_lite/sokoban.py",))


def write_levels(folder: str | Path, count: int, seed: int = 0, env_files: bool = False) -> Path:
    """Write `count` generated levels as a JSONL benchmark file (and level files when `env_files`, with rows
    pointing at them by `env_path`, as LMM-R1's rows do); returns the JSONL path."""
    folder, rng = Path(folder), random.Random(f"sokoban-benchmark-{seed}")
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        level, solution = game.generate_level(rng)
        row = {"id": f"sokoban-{seed}-{i}", "solution": ", ".join(solution)}
        if env_files:
            (folder / "levels").mkdir(exist_ok=True)
            (folder / "levels" / f"{i}.txt").write_text(level.replace("/", "\n") + "\n")
            row.update(env_path=f"levels/{i}.txt", answer="")
        else:
            row["level"] = level
        lines.append(json.dumps(row))
    path = folder / ("sokoban_env.jsonl" if env_files else "sokoban.jsonl")
    path.write_text("\n".join(lines) + "\n")
    return path

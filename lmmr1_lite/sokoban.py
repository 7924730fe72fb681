"""Sokoban-style grid puzzles: level generation, an optimal BFS solver, a simulator, the image, and
`sokoban_reward`, which plays the moves in the completion's answer instead of comparing strings.

A level is text rows: `#` wall, ` ` floor, `@` player, `$` box, `.` target, `*` box on target.
The level travels in the example (`meta["level"]`, rows joined by `/`; a data row's `level` field or
LMM-R1's `env_path` file); the gold answer is one shortest solution, for reference only. The reward
plays the answer's moves (`up`/`down`/`left`/`right`, or `U`/`D`/`L`/`R`) and pays 1.0 when every box
ends on a target, else 0.0. Any word that is not a move makes the answer invalid (0.0).
"""
from __future__ import annotations

import random
import re
from collections import deque

MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
SHORT = {"u": "up", "d": "down", "l": "left", "r": "right"}
MAX_MOVES = 50  # LMM-R1 plays the first 50 actions


def parse_level(text: str) -> tuple[set, set, set, tuple[int, int]]:
    """`(walls, boxes, targets, player)` from a level string (rows separated by '/' or newlines)."""
    rows = text.replace("/", "\n").split("\n")
    walls, boxes, targets, player = set(), set(), set(), None
    for r, row in enumerate(rows):
        for c, ch in enumerate(row):
            if ch == "#":
                walls.add((r, c))
            if ch in "$*":
                boxes.add((r, c))
            if ch in ".*+":
                targets.add((r, c))
            if ch in "@+":
                player = (r, c)
    if player is None or not boxes or len(boxes) != len(targets):
        raise ValueError("level needs one player and as many boxes as targets")
    return walls, boxes, targets, player


def step(walls, boxes: frozenset, player, move):
    """One move; returns (boxes, player) — unchanged when blocked."""
    dr, dc = MOVES[move]
    nxt = (player[0] + dr, player[1] + dc)
    if nxt in walls:
        return boxes, player
    if nxt in boxes:
        beyond = (nxt[0] + dr, nxt[1] + dc)
        if beyond in walls or beyond in boxes:
            return boxes, player
        boxes = (boxes - {nxt}) | {beyond}
    return boxes, nxt


def parse_moves(answer: str) -> list[str] | None:
    """Moves from an answer like 'right, right up' or 'RRU'; None when anything else is in it."""
    words = re.findall(r"[A-Za-z]+", answer)
    if len(words) == 1 and set(words[0].lower()) <= set(SHORT) and words[0].lower() not in MOVES:
        words = list(words[0])
    moves = []
    for word in words:
        word = word.lower()
        move = MOVES.get(word) and word or SHORT.get(word)
        if move is None:
            return None
        moves.append(move)
    return moves


def play(level: str, moves: list[str]) -> bool:
    """True when the first MAX_MOVES moves leave every box on a target."""
    walls, boxes, targets, player = parse_level(level)
    boxes = frozenset(boxes)
    for move in moves[:MAX_MOVES]:
        boxes, player = step(walls, boxes, player, move)
    return boxes == targets


def solve(level: str, limit: int = 20) -> list[str] | None:
    """A shortest solution (BFS over player and box positions), or None within `limit` moves."""
    walls, boxes, targets, player = parse_level(level)
    start = (frozenset(boxes), player)
    seen, queue = {start}, deque([(start, [])])
    while queue:
        (boxes_now, pos), path = queue.popleft()
        if boxes_now == targets:
            return path
        if len(path) >= limit:
            continue
        for move in MOVES:
            state = step(walls, boxes_now, pos, move)
            if state not in seen:
                seen.add(state)
                queue.append((state, path + [move]))
    return None


def generate_level(rng: random.Random, size: int = 6, max_solution: int = 8) -> tuple[str, list[str]]:
    """A random one-box room (walls round the edge, a few inside) with a solution of 2..max_solution moves."""
    while True:
        grid = [["#" if r in (0, size - 1) or c in (0, size - 1) else " " for c in range(size)] for r in range(size)]
        inner = [(r, c) for r in range(1, size - 1) for c in range(1, size - 1)]
        rng.shuffle(inner)
        for r, c in inner[:rng.randint(0, 2)]:
            grid[r][c] = "#"
        free = [p for p in inner if grid[p[0]][p[1]] == " "]
        box, target, player = free[0], free[1], free[2]
        if box[0] in (1, size - 2) or box[1] in (1, size - 2):  # a box against a wall is often stuck
            continue
        grid[box[0]][box[1]], grid[target[0]][target[1]], grid[player[0]][player[1]] = "$", ".", "@"
        level = "/".join("".join(row) for row in grid)
        solution = solve(level, limit=max_solution)
        if solution and len(solution) >= 2:
            return level, solution


def render(level: str, cell: int = 28):
    """The level as a PIL image: grey walls, brown box, green target, blue player."""
    from PIL import Image, ImageDraw

    rows = level.split("/")
    image = Image.new("RGB", (cell * len(rows[0]), cell * len(rows)), "white")
    draw = ImageDraw.Draw(image)
    for r, row in enumerate(rows):
        for c, ch in enumerate(row):
            box = [c * cell, r * cell, (c + 1) * cell - 1, (r + 1) * cell - 1]
            if ch == "#":
                draw.rectangle(box, fill=(90, 90, 90))
            if ch in ".*+":
                draw.ellipse([box[0] + 6, box[1] + 6, box[2] - 6, box[3] - 6], fill=(40, 180, 60))
            if ch in "$*":
                draw.rectangle([box[0] + 3, box[1] + 3, box[2] - 3, box[3] - 3], fill=(150, 90, 30))
            if ch in "@+":
                draw.ellipse([box[0] + 4, box[1] + 4, box[2] - 4, box[3] - 4], fill=(40, 80, 220))
    return image


def solves(completion: str, level: str) -> float:
    """1.0 when the moves in the completion's answer solve `level`, else 0.0 (also for no or invalid moves)."""
    from .answers import extract_answer

    predicted = extract_answer(completion)
    moves = parse_moves(predicted) if predicted and len(predicted) < 2000 else None
    if not moves:
        return 0.0
    try:
        return 1.0 if play(level, moves) else 0.0
    except ValueError:
        return 0.0


def sokoban_rewards(completions: list[str], examples: list) -> list[float]:
    """The `sokoban` reward: each completion's moves played on its example's level (`meta["level"]`);
    an example without a level scores 0."""
    return [solves(c, e.meta["level"]) if e.meta.get("level") else 0.0 for c, e in zip(completions, examples)]

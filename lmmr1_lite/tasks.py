"""Offline task generators: verifiable problems for both stages, deterministic for a seed.

Each generator is `make(rng, level) -> Example` for one row; `generate(task, n, seed)` returns
`(train, test)` with no test prompt in train. Text tasks (FRE) compute answers with sympy; image
tasks (MGT) draw with PIL and return the PIL image in `Example.images` (written to disk by
`lmmr1-lite data generate`). `tiny_*` tasks are the embedded demos' (tiny vocabulary).
"""
from __future__ import annotations

import random
from typing import Callable

import sympy

from .example import Example
from .grade_school import grade_school

# ---------------------------------------------------------------------------------------------
# Tiny demo tasks (fit the tiny tokenizer's vocabulary)
# ---------------------------------------------------------------------------------------------


def tiny_max(rng: random.Random, level: int) -> Example:
    """`max(a,b)` over digits; the answer is one token of the tiny vocabulary."""
    a, b = rng.randrange(10), rng.randrange(10)
    return Example(prompt=f"max({a},{b})", answer=str(max(a, b)))


def tiny_compare(rng: random.Random, level: int) -> Example:
    """`a<b?` over digits, answered `yes` or `no`."""
    a, b = rng.randrange(10), rng.randrange(10)
    return Example(prompt=f"{a}<{b}?", answer="yes" if a < b else "no")


COLOR_SENTENCES = ["the {shape} is {color}", "a {color} {shape}", "{color} {shape}", "the color of the {shape} is {color}",
                   "the {shape} is a {color} {shape}"]


def tiny_color_text(rng: random.Random, level: int) -> Example:
    """The text half of the demo pair: a sentence names a shape's colour; `what color` -> that colour word.
    The embedded FRE default learns it from text; the MGT default (`tiny_color`) asks the same of an image."""
    color = rng.choice(list(COLORS))
    sentence = rng.choice(COLOR_SENTENCES).format(shape=rng.choice(["circle", "square", "triangle"]), color=color)
    return Example(prompt=f"{sentence} . what color", answer=color)


def tiny_color(rng: random.Random, level: int) -> Example:
    """One large shape in one of four colours on white: `what color` -> a colour word (tiny vocabulary).
    Every image token carries the colour, so a tiny random vision tower's features separate them."""
    image, draw = _canvas(112)
    size = rng.randint(60, 100)
    x, y = rng.randint(0, 112 - size), rng.randint(0, 112 - size)
    color = rng.choice(list(COLORS))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x, y, x + size, y + size], fill=COLORS[color])
    return Example(prompt="what color", answer=color, images=[image])


# ---------------------------------------------------------------------------------------------
# FRE: text-only math. `level` 1..3 scales operand sizes and step counts.
# ---------------------------------------------------------------------------------------------


def arithmetic(rng: random.Random, level: int) -> Example:
    """Multi-step integer arithmetic with precedence and parentheses."""
    hi = 10 ** level
    terms = [rng.randint(1, hi) for _ in range(level + 2)]
    ops = [rng.choice(["+", "-", "\\times"]) for _ in range(level + 1)]
    expr = str(terms[0])
    for op, term in zip(ops, terms[1:]):
        grouped = rng.random() < 0.3 and any(o in expr for o in "+-")  # parentheses only where they matter
        expr = f"({expr}) {op} {term}" if grouped else f"{expr} {op} {term}"
    value = sympy.sympify(expr.replace("\\times", "*"))
    return Example(prompt=f"Compute ${expr}$.", answer=sympy.latex(value))


def fractions(rng: random.Random, level: int) -> Example:
    """Sums and products of fractions; the answer in lowest terms."""
    count = level + 1
    parts = []
    while len(parts) < count:
        part = sympy.Rational(rng.randint(1, 4 * level + 4), rng.randint(2, 6 * level + 3))
        if part.q != 1:  # a real fraction, not an integer in disguise
            parts.append(part)
    ops = [rng.choice(["+", "-", "\\cdot"]) for _ in range(count - 1)]
    python_ops = {"+": "+", "-": "-", "\\cdot": "*"}
    expr = sympy.latex(parts[0]) + "".join(f" {op} {sympy.latex(p)}" for op, p in zip(ops, parts[1:]))
    # our own generated expression (never model output), parsed with the usual precedence
    value = sympy.sympify(f"Rational({parts[0].p},{parts[0].q})" + "".join(
        f" {python_ops[op]} Rational({p.p},{p.q})" for op, p in zip(ops, parts[1:])))
    return Example(prompt=f"Compute ${expr}$ and simplify.", answer=sympy.latex(value))


def linear_equation(rng: random.Random, level: int) -> Example:
    """`a x + b = c x + d`, solved for x (integer or fraction)."""
    x = sympy.Symbol("x")
    a, c = rng.randint(2, 5 * level + 4), rng.randint(0, 3 * level)
    if a == c:
        a += 1
    b, d = rng.randint(-10 * level, 10 * level), rng.randint(-10 * level, 10 * level)
    solution = sympy.solve(sympy.Eq(a * x + b, c * x + d), x)[0]
    lhs = sympy.latex(a * x + b)
    rhs = sympy.latex(c * x + d)
    return Example(prompt=f"Solve for $x$: ${lhs} = {rhs}$.", answer=sympy.latex(solution))


def word_problem(rng: random.Random, level: int) -> Example:
    """Short multi-step word problems (shopping, sharing, rates)."""
    name = rng.choice(["Ann", "Ben", "Chen", "Dana", "Eli", "Fatima"])
    kind = rng.randrange(3)
    if kind == 0:
        start, bags, per_bag, eaten = rng.randint(2, 20), rng.randint(2, 3 + level), rng.randint(2, 6 * level), rng.randint(0, 5)
        prompt = (f"{name} has {start} apples, buys {bags} bags of {per_bag} apples each, then eats {eaten}. "
                  "How many apples does {0} have now?").format(name)
        answer = start + bags * per_bag - eaten
    elif kind == 1:
        people, each = rng.randint(2, 6), rng.randint(2, 5 * level)
        total = people * each + rng.randint(0, people - 1)  # the remainder is smaller than a share: unambiguous
        prompt = (f"{name} shares {total} stickers equally among {people} friends and keeps the rest. "
                  "How many stickers does each friend get?")
        answer = each
    else:
        speed, hours = rng.randint(3, 20 * level), rng.randint(2, 3 + level)
        prompt = f"{name} cycles at {speed} km per hour for {hours} hours. How many kilometres is that?"
        answer = speed * hours
    return Example(prompt=prompt, answer=str(answer))


NAMES = ["Ann", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena"]


def multi_step(rng: random.Random, level: int) -> Example:
    """GSM8K-style word problems of two to four steps (money and change, discounts, rates, schedules,
    ages, recipes), written here: none is a GSM8K problem. Integer answers. `level` scales the numbers."""
    name, other = rng.sample(NAMES, 2)
    k = rng.randrange(8)
    scale = level
    if k == 0:
        price, count, paid = rng.randint(2, 9 * scale), rng.randint(2, 6), 0
        paid = (price * count // 10 + 1 + rng.randint(0, 3)) * 10
        prompt = (f"{name} buys {count} notebooks at ${price} each and pays with ${paid}. "
                  f"How much change, in dollars, does {name} get back?")
        answer = paid - price * count
    elif k == 1:
        price, off = rng.randint(2, 20 * scale) * 10, rng.choice([10, 20, 25, 50])
        count = rng.randint(2, 4)
        prompt = (f"A jacket costs ${price}. It is on sale for {off}% off. {name} buys {count} of them. "
                  "How many dollars does {0} spend?").format(name)
        answer = price * (100 - off) // 100 * count
        if price * (100 - off) % 100:
            return multi_step(rng, level)
    elif k == 2:
        per_day, days, weeks = rng.randint(2, 12 * scale), rng.randint(3, 6), rng.randint(2, 5)
        prompt = (f"{name} reads {per_day} pages a day, {days} days a week. How many pages does {name} read "
                  f"in {weeks} weeks?")
        answer = per_day * days * weeks
    elif k == 3:
        age, diff, years = rng.randint(5, 15 * scale), rng.randint(2, 30), rng.randint(2, 10)
        prompt = (f"{name} is {age} years old. {other} is {diff} years older than {name}. How old will "
                  f"{other} be in {years} years?")
        answer = age + diff + years
    elif k == 4:
        cups, batches, bag = rng.randint(2, 5), rng.randint(3, 9 * scale), rng.randint(2, 4)
        prompt = (f"A recipe needs {cups} cups of flour per batch. {name} bakes {batches} batches and already "
                  f"has {bag} cups of flour. How many more cups of flour does {name} need?")
        answer = cups * batches - bag
        if answer <= 0:
            return multi_step(rng, level)
    elif k == 5:
        speed, hours, back = rng.randint(20, 60 * scale), rng.randint(2, 5), rng.randint(1, 3)
        prompt = (f"{name} drives at {speed} miles per hour for {hours} hours, then walks {back} miles back. "
                  f"How far from the start, in miles, is {name} now?")
        answer = speed * hours - back
    elif k == 6:
        boxes, per_box, broken, sold = rng.randint(3, 9), rng.randint(6, 12 * scale), rng.randint(1, 5), 0
        sold = rng.randint(1, boxes * per_box - broken)
        prompt = (f"A shop receives {boxes} boxes of {per_box} cups. {broken} cups are broken and thrown away, "
                  f"and {sold} cups are sold. How many cups are left?")
        answer = boxes * per_box - broken - sold
    else:
        wage, hours, bonus, spend = rng.randint(8, 20 * scale), rng.randint(4, 10), rng.randint(5, 50), 0
        spend = rng.randint(1, wage * hours)
        prompt = (f"{name} earns ${wage} an hour and works {hours} hours, then gets a ${bonus} bonus and "
                  f"spends ${spend} on groceries. How many dollars does {name} have left from this pay?")
        answer = wage * hours + bonus - spend
    return Example(prompt=prompt, answer=str(answer))


# ---------------------------------------------------------------------------------------------
# MGT: image + text. Large, high-contrast drawings that a small vision tower can read.
# ---------------------------------------------------------------------------------------------
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 30)}


def _font(size: int = 18):
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _canvas(size: int = 224):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), "white")
    return image, ImageDraw.Draw(image)


def geometry(rng: random.Random, level: int) -> Example:
    """A triangle with two labelled angles (find the third), or a rectangle with labelled sides (area)."""
    image, draw = _canvas()
    if rng.random() < 0.5:
        a = rng.randint(25, 100)
        b = rng.randint(25, 150 - a)
        pts = [(30, 190), (194, 190), (rng.randint(60, 160), 40)]
        draw.polygon(pts, outline="black", width=3)
        draw.text((36, 164), f"{a}°", fill="black", font=_font())
        draw.text((150, 164), f"{b}°", fill="black", font=_font())
        draw.text((pts[2][0] - 5, 62), "x", fill="black", font=_font())
        return Example(prompt="The triangle's two marked angles are given. Find the angle $x$ in degrees.",
                       answer=str(180 - a - b), images=[image])
    w, h = rng.randint(2, 6 * level + 3), rng.randint(2, 6 * level + 3)
    draw.rectangle([40, 60, 184, 164], outline="black", width=3)
    draw.text((104, 170), f"{w} cm", fill="black", font=_font())
    draw.text((8, 106), f"{h} cm", fill="black", font=_font())
    return Example(prompt="What is the area of the rectangle in square centimetres?", answer=str(w * h), images=[image])


def chart(rng: random.Random, level: int) -> Example:
    """A labelled bar chart; questions read values and compute from them."""
    image, draw = _canvas()
    labels = rng.sample(["A", "B", "C", "D", "E"], 3 + (level > 1))
    values = [rng.randint(1, 9 * level) for _ in labels]
    top = max(values)
    width = 180 // len(labels)
    for i, (label, value) in enumerate(zip(labels, values)):
        x0, height = 22 + i * width, int(140 * value / top)
        draw.rectangle([x0, 190 - height, x0 + width - 12, 190], fill=(70, 110, 200))
        draw.text((x0 + 6, 194), label, fill="black", font=_font())
        draw.text((x0 + 6, 168 - height), str(value), fill="black", font=_font())
    question = rng.randrange(3)
    if question == 0:
        if values.count(top) == 1:
            return Example(prompt="Which bar is the tallest? Answer with its letter.",
                           answer=labels[values.index(top)], images=[image])
        return Example(prompt="What is the largest value in the chart?", answer=str(top), images=[image])
    if question == 1:
        return Example(prompt="What is the sum of all the bars' values?", answer=str(sum(values)), images=[image])
    i, j = rng.sample(range(len(labels)), 2)
    return Example(prompt=f"By how much does bar {labels[i]} exceed bar {labels[j]}? (A negative answer is allowed.)",
                   answer=str(values[i] - values[j]), images=[image])


def count_shapes(rng: random.Random, level: int) -> Example:
    """Large coloured shapes on a grid: how many of one colour?"""
    image, draw = _canvas()
    cells = [(r, c) for r in range(3) for c in range(3)]
    rng.shuffle(cells)
    shown = cells[:rng.randint(2, 3 + 2 * level if level < 3 else 9)]
    colors = [rng.choice(list(COLORS)) for _ in shown]
    for (r, c), color in zip(shown, colors):
        box = [12 + c * 70, 12 + r * 70, 72 + c * 70, 72 + r * 70]
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=COLORS[color])
    asked = rng.choice(colors)
    return Example(prompt=f"How many {asked} shapes are in the image?", answer=str(colors.count(asked)), images=[image])


def sokoban(rng: random.Random, level: int) -> Example:
    """A one-box Sokoban room; the answer is a move sequence checked by the simulator reward."""
    from . import sokoban as game

    layout, solution = game.generate_level(rng, size=6, max_solution=4 + 2 * level)
    prompt = ("Push the brown box onto the green target. You are the blue circle; grey cells are walls. "
              "Answer with your moves, each one of up, down, left, right.")
    return Example(prompt=prompt, answer=" ".join(solution), images=[game.render(layout)],
                   meta={"level": layout, "solution": " ".join(solution)})


TASKS: dict[str, Callable[[random.Random, int], Example]] = {
    "tiny_max": tiny_max, "tiny_compare": tiny_compare, "tiny_color": tiny_color,
    "tiny_color_text": tiny_color_text,
    "arithmetic": arithmetic, "fractions": fractions, "linear_equation": linear_equation, "word_problem": word_problem,
    "multi_step": multi_step, "grade_school": grade_school,
    "geometry": geometry, "chart": chart, "count_shapes": count_shapes, "sokoban": sokoban,
}
IMAGE_TASKS = {"tiny_color", "geometry", "chart", "count_shapes", "sokoban"}


def generate(task: str, n_train: int, n_test: int, seed: int, level: int = 1) -> tuple[list[Example], list[Example]]:
    """Deterministic train/test rows; test prompts (with their image content) never appear in train."""
    make = TASKS[task]
    rng = random.Random(f"{task}-{seed}-{level}")
    test, keys = [], set()
    attempts = 0
    while len(test) < n_test and attempts < 50 * (n_test + 1):
        attempts += 1
        example = make(rng, level)
        key = _key(example)
        if key in keys or len(keys) < _distinct_limit(task):
            keys.add(key)
            test.append(example)
    train = []
    attempts = 0
    while len(train) < n_train and attempts < 50 * (n_train + 1):
        attempts += 1
        example = make(rng, level)
        if _key(example) not in keys:
            train.append(example)
    if len(train) < n_train:
        raise ValueError(f"task {task}: could not draw {n_train} train rows disjoint from the test split")
    return train, test


def _key(example: Example) -> tuple:
    """What makes two rows the same problem: prompt, answer and (for images) the pixels."""
    pixels = tuple(image.tobytes() for image in example.images if hasattr(image, "tobytes"))
    return example.prompt, example.answer, hash(pixels)


def _distinct_limit(task: str) -> int:
    """The tiny text tasks have few distinct problems (100, or 60 for tiny_color_text): hold out a fifth."""
    return {"tiny_max": 20, "tiny_compare": 20, "tiny_color_text": 12}.get(task, 10**9)

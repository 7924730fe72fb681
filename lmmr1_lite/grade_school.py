"""`grade_school`: generated word problems in the shapes GSM8K's answers need, written here (none is a GSM8K
problem; tests/test_gsm8k.py checks the shipped test problems are not among them).

`multi_step` (tasks.py) has eight templates of adding and multiplying; a 0.5B model learns them in a few steps
and nothing carries over to GSM8K, whose errors are in reading the problem: units (feet and inches, minutes and
hours, dozens), percentages and fractions of a part, "k more than twice", working backwards, rounding up to
whole buses. Each template below is one such shape; `level` scales the numbers. Every answer is a whole number,
computed from the drawn numbers (a draw that would give a fraction is drawn again).
"""
from __future__ import annotations

import random
from typing import Callable, Optional

from .example import Example

NAMES = ["Ann", "Ben", "Chen", "Dana", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kofi", "Lena", "Maya", "Nico",
         "Omar", "Priya", "Quinn", "Rosa", "Sam", "Tariq"]
Draw = Callable[[random.Random, int, str, str], Optional[tuple[str, int]]]  # None: draw again


def rope_pieces(r, s, name, other):
    feet, piece = r.randint(2, 6 * s), r.choice([2, 3, 4, 6, 8, 9, 12])
    if feet * 12 % piece:
        return None
    return (f"{name} has a rope that is {feet} feet long and cuts it into pieces that are each {piece} inches long. "
            f"How many pieces does {name} get?", feet * 12 // piece)


def class_percent(r, s, name, other):
    students, girls, third = r.randint(10, 40 * s), r.choice([20, 25, 40, 50, 60, 75]), r.choice([2, 3, 4])
    boys = students - students * girls // 100
    if students * girls % 100 or boys % third:
        return None
    return (f"A class has {students} students, and {girls}% of them are girls. 1/{third} of the boys play soccer. "
            f"How many boys do not play soccer?", boys - boys // third)


def fractions_of_money(r, s, name, other):
    money, a, b = r.randint(4, 60 * s) * 10, r.choice([2, 4, 5]), r.choice([2, 3, 4])
    rest = money - money // a
    if money % a or rest % b:
        return None
    return (f"{name} has ${money}. {name} spends 1/{a} of it on books and then 1/{b} of what is left on food. "
            f"How many dollars does {name} have left?", rest - rest // b)


def twice_plus(r, s, name, other):
    n, k = r.randint(3, 15 * s), r.randint(1, 10)
    b = 2 * n + k
    if b % 2:
        return None
    return (f"{name} has {n} marbles. {other} has {k} more than twice as many marbles as {name}. Sam has half as "
            f"many marbles as {other}. How many marbles do the three of them have altogether?", n + b + b // 2)


def machine_rate(r, s, name, other):
    made, minutes, hours = r.randint(2, 8 * s), r.choice([5, 10, 12, 15, 20, 30]), r.randint(2, 3 + 2 * s)
    return (f"A machine makes {made} toys every {minutes} minutes. How many toys does it make in {hours} hours?",
            made * (60 // minutes) * hours)


def savings(r, s, name, other):
    weekly, months, bike = r.randint(5, 25 * s), r.randint(2, 6), r.randint(20, 100 * s)
    saved = weekly * 4 * months
    if bike >= saved:
        return None
    return (f"{name} saves ${weekly} every week for {months} months, then buys a bike for ${bike}. If a month has "
            f"4 weeks, how many dollars does {name} have left?", saved - bike)


def profit(r, s, name, other):
    count, cost, extra, stall = r.randint(5, 20 * s), r.randint(2, 10 * s), r.randint(1, 6), r.randint(5, 40)
    gain = count * extra - stall
    if gain <= 0:
        return None
    return (f"{name} buys {count} candles for ${cost} each and sells every one of them for ${cost + extra}. "
            f"{name} also pays ${stall} for a market stall. What is {name}'s profit in dollars?", gain)


def average_needed(r, s, name, other):
    scores, target = [r.randint(60, 100) for _ in range(3)], r.randint(70, 95)
    needed = 4 * target - sum(scores)
    if not 0 <= needed <= 100:
        return None
    return (f"{name} scored {scores[0]}, {scores[1]} and {scores[2]} on three tests. What score does {name} need "
            f"on the fourth test to have an average of {target}?", needed)


def dozens(r, s, name, other):
    dozen, eaten, given, bag = r.randint(2, 4 * s), r.randint(1, 6), r.randint(2, 10), r.choice([3, 4, 5, 6])
    rest = 12 * dozen - eaten - given
    if rest <= 0 or rest % bag:
        return None
    return (f"{name} bakes {dozen} dozen cookies, eats {eaten} of them and gives {given} to {other}. {name} packs "
            f"the rest into bags of {bag}. How many bags does {name} fill?", rest // bag)


def tip(r, s, name, other):
    bill, pct, people = r.randint(2, 20 * s) * 10, r.choice([10, 15, 20, 25]), r.randint(2, 5)
    total = bill + bill * pct // 100
    if bill * pct % 100 or total % people:
        return None
    return (f"Dinner for {people} friends costs ${bill}, and they add a {pct}% tip. They split the total equally. "
            f"How many dollars does each friend pay?", total // people)


def raise_then_discount(r, s, name, other):
    price, pct, off = r.randint(2, 30 * s) * 10, r.choice([10, 20, 25, 50]), r.randint(1, 5) * 5
    raised = price + price * pct // 100
    if price * pct % 100 or off >= raised:
        return None
    return (f"A bike costs ${price}. Its price goes up by {pct}%, and then {name} uses a ${off} coupon. How many "
            f"dollars does {name} pay for the bike?", raised - off)


def ages_later(r, s, name, other):
    age, years = r.randint(3, 12 * s), r.randint(2, 10)
    now = 2 * (age + years) - years
    return (f"{name} is {age} years old. In {years} years, {other} will be twice as old as {name} will be then. "
            f"How old is {other} now?", now)


def train_speed(r, s, name, other):
    hours, speed, later = r.randint(2, 6), r.randint(20, 40 * s), r.randint(2, 9)
    return (f"A train travels {speed * hours} miles in {hours} hours. At the same speed, how many miles does it "
            f"travel in {later} hours?", speed * later)


def practice_hours(r, s, name, other):
    minutes, days, weeks = r.choice([15, 20, 30, 40, 45, 60, 90]), r.randint(2, 7), r.randint(2, 4 * s)
    total = minutes * days * weeks
    if total % 60:
        return None
    return (f"{name} practises the piano for {minutes} minutes a day, {days} days a week. How many hours does "
            f"{name} practise in {weeks} weeks?", total // 60)


def legs(r, s, name, other):
    chickens, cows, ducks = r.randint(2, 15 * s), r.randint(1, 8 * s), r.randint(0, 10 * s)
    return (f"A farm has {chickens} chickens, {cows} cows and {ducks} ducks. How many legs do these animals have "
            f"in total?", 2 * chickens + 4 * cows + 2 * ducks)


def tank_fill(r, s, name, other):
    rate, minutes, have = r.randint(2, 8 * s), r.randint(5, 30), r.randint(5, 50 * s)
    return (f"A tank holds {have + rate * minutes} liters of water and already has {have} liters in it. A hose "
            f"adds {rate} liters every minute. How many minutes does it take to fill the tank?", minutes)


def coins(r, s, name, other):
    quarters, dimes, nickels = r.randint(2, 12 * s), r.randint(0, 15 * s), r.randint(0, 10 * s)
    cents = 25 * quarters + 10 * dimes + 5 * nickels
    if cents % 100 == 0:
        return (f"{name} has {quarters} quarters, {dimes} dimes and {nickels} nickels. How many dollars does "
                f"{name} have?", cents // 100)
    return (f"{name} has {quarters} quarters, {dimes} dimes and {nickels} nickels. How many cents does {name} "
            f"have?", cents)


def pizza_share(r, s, name, other):
    pizzas, slices, people, left = r.randint(2, 3 * s + 1), r.choice([6, 8, 10, 12]), r.randint(3, 8), r.randint(0, 4)
    shared = pizzas * slices - left
    if shared <= 0 or shared % people:
        return None
    return (f"{name} orders {pizzas} pizzas, each cut into {slices} slices. {people} people share the slices "
            f"equally, and {left} slices are left over. How many slices does each person eat?", shared // people)


def run_difference(r, s, name, other):
    a, da, b, db = r.randint(2, 6 * s), r.randint(3, 7), r.randint(1, 6 * s), r.randint(3, 7)
    if a * da <= b * db:
        return None
    return (f"{name} runs {a} miles a day for {da} days. {other} runs {b} miles a day for {db} days. How many more "
            f"miles does {name} run than {other}?", a * da - b * db)


def shopping_discount(r, s, name, other):
    shirts, shirt, pants, pant = r.randint(1, 4), r.randint(5, 15 * s), r.randint(1, 3), r.randint(10, 25 * s)
    pct = r.choice([10, 20, 25, 50])
    total = shirts * shirt + pants * pant
    if total * pct % 100:
        return None
    return (f"{name} buys {shirts} shirts at ${shirt} each and {pants} pairs of pants at ${pant} each. The store "
            f"takes {pct}% off the total. How many dollars does {name} pay?", total - total * pct // 100)


def loaves_left(r, s, name, other):
    loaves, part, later = r.randint(10, 60 * s), r.choice([2, 3, 4, 5]), r.randint(1, 10)
    rest = loaves - loaves // part - later
    if loaves % part or rest < 0:
        return None
    return (f"A baker makes {loaves} loaves of bread. She sells 1/{part} of them in the morning and {later} more "
            f"in the afternoon. How many loaves are left?", rest)


def work_backwards(r, s, name, other):
    gave, left = r.randint(2, 10 * s), r.randint(2, 20 * s)
    return (f"{name} had some stickers. {name} gave {gave} of them to {other} and then lost half of the rest. Now "
            f"{name} has {left} stickers. How many stickers did {name} have at first?", 2 * left + gave)


def overtime(r, s, name, other):
    wage, hours = r.randint(5, 15 * s) * 2, r.randint(41, 50)
    return (f"{name} earns ${wage} an hour for the first 40 hours of a week and 1.5 times that for every hour "
            f"over 40. How many dollars does {name} earn in a week of {hours} hours?",
            40 * wage + (hours - 40) * wage * 3 // 2)


def fence_cost(r, s, name, other):
    length, width, cost = r.randint(5, 20 * s), r.randint(3, 15 * s), r.randint(2, 9)
    return (f"A rectangular garden is {length} feet long and {width} feet wide. Fencing costs ${cost} per foot. "
            f"How many dollars does it cost to put a fence all the way around the garden?", 2 * (length + width) * cost)


def buses_needed(r, s, name, other):
    students, teachers, seats = r.randint(30, 120 * s), r.randint(2, 8), r.choice([20, 25, 30, 40, 45, 50])
    people = students + teachers
    if people % seats == 0:
        return None
    return (f"{students} students and {teachers} teachers go on a school trip. Each bus holds {seats} people. What "
            f"is the smallest number of buses they need?", -(-people // seats))


def percent_more(r, s, name, other):
    books, pct = r.randint(4, 30 * s), r.choice([25, 50, 75, 100, 150])
    more = books * pct
    if more % 100:
        return None
    return (f"Last year {name} read {books} books. This year {name} read {pct}% more books than last year. How many "
            f"books did {name} read in the two years together?", 2 * books + more // 100)


TEMPLATES: list[Draw] = [
    rope_pieces, class_percent, fractions_of_money, twice_plus, machine_rate, savings, profit, average_needed,
    dozens, tip, raise_then_discount, ages_later, train_speed, practice_hours, legs, tank_fill, coins, pizza_share,
    run_difference, shopping_discount, loaves_left, work_backwards, overtime, fence_cost, buses_needed,
    percent_more,
]


def grade_school(rng: random.Random, level: int) -> Example:
    """One problem from a template drawn uniformly; `level` (1-3) scales its numbers."""
    template = rng.choice(TEMPLATES)
    while True:
        name, other = rng.sample([n for n in NAMES if n != "Sam"], 2)
        drawn = template(rng, max(1, level), name, other)
        if drawn is not None:
            prompt, answer = drawn
            return Example(prompt=prompt, answer=str(answer), meta={"template": template.__name__})

"""Multiple choice: which option an extracted answer names, by letter or by the option's text.

"B", "(B)", "B.", "B) 2", "B. 2", "Option B" and the option text "2" all name option B when the options
make that unambiguous (the text matches exactly one option). Official rules this follows:
- MathVista's calculate_score.normalize_extracted_answer takes the letter in "(A) text" and maps a letter to
  its choice (lupantech/MathVista evaluation/calculate_score.py);
- MathVision counts a response equal to the letter or to the gold option's text (mathllm/MATH-V
  evaluation/evaluate.py: `is_equal(gt_answer, ...) or is_equal(gt_answer_value, ...)`);
- MM-Star reads the letter at the start of the prediction, after "(" or "option " (MMStar-Benchmark/MMStar
  eval/vlmeval/evaluate/mmstar.py).
"""
from __future__ import annotations

import re

LETTERS = "ABCDEFGHIJ"
MAX_CHARS = 500  # longer "answers" are not options; they are compared by nothing (and score 0)
_LEADING = re.compile(r"\(?([A-Ja-j])(?:\)|\.|:|$)")
_NAMED = re.compile(r"(?:option|choice)\s*\(?([A-J])\)?(?:\W|$)", re.IGNORECASE)
_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mathbf)\{([^{}]*)\}")
# An option letter standing alone ("(B)", "B.", "B or D"), not inside a word or after a backslash
# (named_letters then skips the article: "A quick check shows ...").
_STANDALONE = re.compile(r"(?<![A-Za-z0-9\\])(\()?([A-J])\)?(?![A-Za-z0-9])")
SHORT_ANSWER = 100  # the nearest-option fallback reads answers up to this long (and twice the longest option)


def letters_for(count: int) -> str:
    """Option letters of a question with `count` options ("ABCD" for four)."""
    return LETTERS[:count]


def options_dict(options) -> dict[str, str]:
    """{"A": text, ...} from a list of option texts (MathVista `choices`, MathVision `options`)."""
    return {LETTERS[i]: str(text) for i, text in enumerate(options or [])}


def normalise(text: str) -> str:
    """Case, spaces, `$`, `\\text{}` wrappers and a final full stop do not change which option is meant."""
    text = _WRAPPERS.sub(r"\1", text)
    return "".join(text.split()).strip("$").rstrip(".").lower()


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def by_text(answer: str, options: dict[str, str]) -> str | None:
    """The letter of the one option whose text equals the answer (as text, or as a plain number)."""
    wanted, number = normalise(answer), _number(normalise(answer))
    hits = [letter for letter, text in options.items()
            if normalise(text) == wanted or (number is not None and _number(normalise(text)) == number)]
    return hits[0] if len(set(hits)) == 1 else None


def named_letters(text: str, valid: str) -> set[str]:
    """The option letters (of `valid`) that `text` names as standalone tokens: "(A), (C), and (E)" names
    three, "either B or D" two, "The suitcase is on the book." none. Linear (one pass of a fixed regex)."""
    found = set()
    for match in _STANDALONE.finditer(text):
        letter = match.group(2)
        after = text[match.end():match.end() + 5]
        article = letter == "A" and not match.group(1) and after[:1] == " " and after[1:2].islower() \
            and not after.startswith((" or ", " and", " nor "))
        if letter in valid and not article:
            found.add(letter)
    return found


def resolve(answer: str | None, options: dict[str, str], letters: str = "") -> str | None:
    """The option letter an extracted answer names, or None.

    A letter is accepted alone or leading the answer ("(B) 8/11", "B. 2", "Option B", "(C) Solution A");
    otherwise the answer must equal exactly one option's text. An answer that names several options
    ("(A), (C), and (E)", "either B or D", "B. 2 or D. 4") names none: a hedge scores 0. `letters` are
    the valid letters when the option texts are unknown (a question whose options could not be parsed)."""
    if not answer or len(answer) > 2 * MAX_CHARS:
        return None
    text = _WRAPPERS.sub(r"\1", answer.strip()).strip().strip("*$").strip()
    if not text or len(text) > MAX_CHARS:
        return None
    valid = "".join(options) or letters
    named = _NAMED.match(text)
    match = named or _LEADING.match(text)
    if match and match.group(1).upper() in valid:
        letter, rest = match.group(1).upper(), text[match.end():].strip(" .:)")
        single = len(text.strip("().:")) == 1
        # a lone lower-case letter is a letter; "a triangle" is not, but "(a) triangle" and "a. 2" are
        if named or match.group(1).isupper() or single or text[0] == "(" or text[1:2] in ".:)":
            if rest and options and normalise(rest) == normalise(options.get(letter, "")):
                return letter  # "(C) Solution A": the letter and its own text
            return None if named_letters(rest, valid) - {letter} else letter
    return by_text(text, options) if options else None  # an option's text: "Solution A and B" names no hedge


def inline_options(question: str) -> dict[str, str]:
    """Options written inside the question text after "Options:" or "Choices:" (MM-Star writes
    "Options: A: x, B: y, C: z, D: w"; MathVerse writes "Choices:\\nA:x\\nB:y"); {} when not found."""
    low = question.lower()
    start = max(low.rfind("options:"), low.rfind("choices:"))
    if start < 0:
        return {}
    body = question[start + len("options:"):]
    found, position = [], 0
    for letter in LETTERS:
        if not found:  # the first option opens the list: "A:", "A." or "(A)"
            marks = [f"{letter}:", f"{letter}.", f"({letter})"]
        else:  # later ones follow a separator: "\nB:", ", B:", " B.", "\n(B)"...
            marks = [f"{sep}{letter}{end}" for sep in ("\n", ", ", " ") for end in (":", ".")]
            marks += [f"\n({letter})", f" ({letter})"]
        hits = [(body.find(m, position), m) for m in marks]
        hits = [(at, m) for at, m in hits if at >= 0 and (found or not body[:at].strip())]
        if not hits:
            break
        at, mark = min(hits)
        found.append((letter, at, at + len(mark)))
        position = at + len(mark)
    if len(found) < 2:
        return {}
    spans = [(letter, begin, found[i + 1][1] if i + 1 < len(found) else len(body))
             for i, (letter, _, begin) in enumerate(found)]
    return {letter: body[begin:end].strip().rstrip(",").strip() for letter, begin, end in spans}


def edit_distance(a: str, b: str, cap: int = 256) -> int:
    """Levenshtein distance of the first `cap` characters of each (bounded work on hostile input)."""
    a, b = a[:cap], b[:cap]
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def nearest(answer: str, options: dict[str, str]) -> str | None:
    """The letter of the option with the smallest edit distance to the answer (first on ties), as
    MathVista's get_most_similar does with Levenshtein distance (lupantech/MathVista calculate_score.py),
    for a short answer only: theirs reads GPT's extraction, a few words at most, so a whole sentence of
    ours (longer than SHORT_ANSWER characters or twice the longest option) matches no option (None), nor
    does an answer naming several option letters."""
    longest = max((len(text) for text in options.values()), default=0)
    if not options or len(answer) > min(SHORT_ANSWER, max(2 * longest, 8)):
        return None
    if len(named_letters(answer, "".join(options))) > 1:
        return None
    return min(options, key=lambda letter: edit_distance(answer, options[letter]))

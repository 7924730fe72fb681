"""Answer extraction for benchmark completions, serving both prompt modes in linear time.

Order (first that yields text wins):
1. the last `<answer>...</answer>` block (lmmr1 mode); a `\\boxed{}` inside it wins over the rest of it, then
   an answer phrase inside it ("<answer>The answer is B</answer>");
2. the last `\\boxed{...}` anywhere (cot mode, and lmmr1 completions that lost their tags);
3. the text after the last answer phrase ("the answer is 5.", "Final answer: 5", "final answer is: B",
   GPQA's "Answer: B", "the correct option is (B) 8/11"), up to the end of that sentence;
4. for multiple-choice rows only, the last line when an option letter leads it ("B. 2", "(C) Solution A"),
   else an option letter ending the completion ("... so D.", "(B)") or forming its first line ("B", "a");
   a conclusion (the last sentence after its "so"/"therefore"/...) naming several letters names none;
5. for multiple-choice rows whose option texts are known, the one option the conclusion names in words
   ("So the shape is a triangle.", "so BC is 4 cm"), as GPT's extraction (MathVista, MathVerse) and
   MM-Star's own matching of option content read it;
6. the concluding value: the last `$...$` formula, else the last number, of the completion's last
   sentence ("So she pays 56 dollars in total.", a bare "56" on the last line), as LightEval's expression
   extraction and lm-evaluation-harness's flexible-extract read prose (the last number of the text).

A completion is hostile input: every step is `str.rfind`/`str.find` plus scans bounded by a constant,
never a regex over the whole text, so '<answer>' * 50000 or a million untagged characters return at once.
"""
from __future__ import annotations

import re

from ..answers import answer_block, last_boxed
from ..verifier import MAX_ANSWER_CHARS
from .choices import named_letters

# Phrases after which official extractors read the answer: MathVision's evaluate.py tries "the final answer
# is", "the answer is", "the correct answer is", "the answer should be" (mathllm/MATH-V evaluation/evaluate.py);
# OlympiadBench reads after "So the final answer is" (OpenBMB/OlympiadBench inference/judge.py); simple-evals'
# GPQA template asks for "Answer: $LETTER" (ForJadeForest/lmm-r1-eval evaluate_text.py).
PHRASES = ("answer is", "answer:", "answer should be", "answer would be", "answer must be", "correct option is",
           "correct choice is", "best option is", "best choice is")
CONCLUSIONS = ("so ", "therefore", "thus", "hence", ": ")
TAIL_CHARS = 300  # how far before the end a closing option letter is looked for
_LETTER_TAIL = re.compile(r"(?:^|[\s(*])\(?([A-J])\)?[\s.*)]*$")     # "... so D." / "(B)"
_LETTER_LEAD = re.compile(r"\(?([A-J])(?:\)|\.|:)(?:\s|$)")             # a last line "B. 2" / "(B) 2"
_LETTER_FIRST = re.compile(r"\(?([A-Ja-j])\)?\.?[ \t]*(?:\n|$)")      # a first line "B" or "a" (MATH-V's startswith)
FORMULA_CHARS = 80  # a last line this short, with no word in it, is the answer itself
_WORD = re.compile(r"[A-Za-z]{3,}")  # a word (after LaTeX commands are removed): prose, not a formula
_COMMAND = re.compile(r"\\[A-Za-z]+")
# a number: sign, digits with thousands separators, decimals, or a fraction a/b
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?")


def clean(answer: str) -> str:
    """Trim what wraps an answer but is not part of it: spaces, `$`, markdown `**`, quotes, a final full stop."""
    text = answer.strip()
    for _ in range(3):  # wrappers nest at most a few levels ("**$5$**.", "\\$34")
        text = text.strip().strip("*").strip().rstrip(".").strip().removeprefix("\\$").strip("$").strip()
        text = text.strip("\"'`")
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


def last_sentence(text: str) -> str:
    """The completion's last sentence: its last non-empty line (of the last TAIL_CHARS characters), from
    after the last ". " in it (a decimal point is no sentence end)."""
    line = text[-TAIL_CHARS:].rstrip().rsplit("\n", 1)[-1].strip()
    return line[line.rfind(". ") + 2:] if ". " in line[:-2] else line


def final_clause(text: str) -> str:
    """The conclusion of the last sentence: after its last "so" / "therefore" / "thus" / "hence" / ":"
    ("Options A and B are wrong, so C." -> "C.")."""
    sentence = last_sentence(text)
    low = sentence.lower()
    return sentence[max((low.rfind(word) + len(word) for word in CONCLUSIONS if word in low), default=0):]


def hedged(text: str, letters: str) -> bool:
    """Whether the conclusion names several option letters ("so it is either B or D")."""
    return len(named_letters(final_clause(text), letters)) > 1


def final_letter(text: str, letters: str) -> str | None:
    """An option letter, one of `letters`, that ends the completion ("... so the choice is D.", "(B)") or is
    the whole first line, upper or lower case (mathllm/MATH-V evaluation/evaluate.py tests `endswith(f"
    {c}.")`, `startswith(f"{c}\\n")` and the like); or the last line itself when an option letter leads it
    ("B. 2", "(C) Solution A": the option's own text may end in a capital; which option the line names is
    then decided knowing the options, by choices.resolve). None when the conclusion names several letters."""
    tail = text[-TAIL_CHARS:].rstrip()
    last_line = tail.rsplit("\n", 1)[-1].strip().strip("*").strip()
    lead = _LETTER_LEAD.match(last_line)
    if lead and lead.group(1) in letters:
        return clean(last_line) if lead.end() < len(last_line) else lead.group(1)
    if hedged(text, letters):
        return None
    ending = _LETTER_TAIL.search(tail)
    if ending and ending.group(1) in letters:
        return ending.group(1)
    first = _LETTER_FIRST.match(text[:TAIL_CHARS].strip())
    if first and first.group(1).upper() in letters and (first.group(1).isupper() or len(text.strip()) <= 4):
        return first.group(1).upper()  # a lower-case letter only as the whole completion ("a", "(b)")
    return None


def concluding_value(text: str) -> str | None:
    """The last `$...$` formula of the last sentence, else its last number ("So she pays $56 in total."
    -> "56", "Thus $x = \\frac{14}{3}$." -> "x = \\frac{14}{3}"), else None."""
    line = text[-TAIL_CHARS:].rstrip().rsplit("\n", 1)[-1].strip()
    if len(line) <= FORMULA_CHARS and not _WORD.search(_COMMAND.sub("", line)) and line.strip("$. "):
        return clean(line)  # the last line is a formula or value alone: "\\frac{14}{3}", "(3, \\pi)", "56"
    sentence = last_sentence(text)
    close = sentence.rfind("$")
    open_ = sentence.rfind("$", 0, close) if close > 0 else -1
    formula = open_ >= 0 and not sentence[close + 1: close + 2].isdigit()  # "$5 and $6" are prices
    if formula and sentence[open_ + 1: close].strip() and sentence[open_ - 1: open_] != "\\":
        return clean(sentence[open_ + 1: close])
    numbers = _NUMBER.findall(sentence)
    return numbers[-1].replace(" ", "") if numbers else None


def mentioned(text: str, options: dict[str, str]) -> str | None:
    """The text of the one option the conclusion names in words ("So the shape is a triangle." ->
    "triangle"), else None: options of two or more characters with a letter in them, as whole words; one
    whose text lies inside another named one ("Solution A" in "Solution A and B") does not count; a
    conclusion with a negation ("not", "n't") names nothing."""
    clause = final_clause(text).lower()
    if not options or " not " in f" {clause} " or "n't" in clause:
        return None
    named = [option for option in options.values()
             if len(option.strip()) >= 2 and any(c.isalpha() for c in option) and re.search(
                 rf"(?<![a-z0-9]){re.escape(option.strip().rstrip('.').lower())}(?![a-z0-9])", clause)]
    named = [option for option in named if not any(option != other and option.lower() in other.lower()
                                                   for other in named)]
    return named[0] if len(named) == 1 else None


def extract_answer(completion: str, letters: str = "", options: dict[str, str] | None = None) -> str | None:
    """The answer text of a completion (see the module docstring for the order); None when there is none.

    `letters` are the option letters of a multiple-choice row (e.g. "ABCD"); they enable rule 4. `options`
    (letter -> text, when known) let rule 5 read an option named in words."""
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
    named = mentioned(completion, options) if letters and options else None
    if letters:
        letter = final_letter(completion, letters)
        if letter or hedged(completion, letters):  # letters of a hedge name nothing ("either B or D"), unless
            return letter or named               # they belong to the one option named ("Solution A and B")
    return named or concluding_value(completion)


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

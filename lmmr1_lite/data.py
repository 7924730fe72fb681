"""Prompts and gold answers: loaders for every common shape of training data, validation with one-line
errors (file, row, field), lazy images, chat messages.

`data` may be a generated task name, a file (JSON Lines, a JSON array of row objects, parquet), a
folder (a `datasets.save_to_disk` dataset, or data files such as an `hf download` snapshot: the files
named by `data_split` when files are named by split), or a Hugging Face Hub dataset id `org/name`
(`datasets.load_dataset(id, name=data_config, split=data_split)`).

Row formats (`data_preset` picks one and the field names; `auto`, the default, looks at each row):
- LMM-R1: `{"message": "<JSON string of [system?, user]>", "answer": "..."}`; the user turn's
  `content` is a list of `{"type": "image", "image": ...}` and `{"type": "text", "text": ...}`.
  Sokoban rows carry `env_path` (a level: gym-sokoban's `.npy` room state, or a text level) and an
  empty answer.
- plain: `{"prompt": "...", "answer": "...", "images": [...]}` (images optional), the keys renamed by
  `prompt_field`, `answer_field` and `image_field` (e.g. DeepScaleR's `problem`).
Images: a path (relative to the file's folder), a `file://` URI, a base64 `data:` URI, encoded bytes,
or a Hugging Face `Image` value (`{"bytes", "path"}`). Every image a row names is decoded once at load
(a truncated or oversized image is a bad row) and then kept as an `ImageRef`: the path or the encoded
bytes and the size, decoded again (and its file closed at once) only when a prompt is built. No file
stays open per row, and memory holds encoded bytes at most, never every decoded image of a dataset.
"""
from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import warnings
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from . import hub
from .config import DATA_PRESETS, ConfigError
from .example import Example  # noqa: F401  (re-exported)
from .rewards import gold_parseable
from .tasks import TASKS, generate


class BadRow(ValueError):
    """A row that cannot be used; str() is the one-line message naming file, row and field, `reason`
    the short form that skipped rows are counted by."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message.split(": ", 1)[-1].split(" (")[0].split(":")[0]


@dataclass
class LoadReport:
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def line(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in self.skipped.most_common())
        return f"{self.rows} rows loaded" + (f", {sum(self.skipped.values())} skipped ({reasons})" if self.skipped else "")


# ---------------------------------------------------------------------------------------------
# Formats and options
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RowFormat:
    """How rows are read: `kind` 'auto' (a row with 'message' is LMM-R1, else plain), 'plain' or 'lmmr1'."""
    kind: str = "auto"
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    image_field: str = "images"
    needs_env: bool = False   # Sokoban: every row must name its level in env_path
    gold_after: str | None = None  # the gold is the text after the last occurrence of this marker (GSM8K: ####)


PRESETS: dict[str, RowFormat] = {  # a preset is a row format plus field names (config: data_preset)
    "auto": RowFormat(),                                   # per row: 'message' -> LMM-R1, else plain
    "plain": RowFormat("plain"),                           # prompt/answer/images, renamed by prompt_field etc.
    "lmmr1": RowFormat("lmmr1"),                           # LMM-R1's message/answer rows
    "deepscaler": RowFormat("plain", prompt_field="problem"),  # FRE-Text: DeepScaleR-Preview problem/answer
    "vermulti": RowFormat("lmmr1"),                        # MGT-PerceReason: LMM-R1 rows with images
    "vermulti_geo": RowFormat("lmmr1"),                    # MGT-Geo: LMM-R1 rows with diagrams
    "sokoban": RowFormat("lmmr1", needs_env=True),         # MGT-Sokoban: LMM-R1 rows whose env_path is the level
    "gsm8k": RowFormat("plain", prompt_field="question", gold_after="####"),  # openai/gsm8k: question/answer
}
assert tuple(PRESETS) == DATA_PRESETS, "config.DATA_PRESETS names the presets, for validation"


@dataclass(frozen=True)
class DataOptions:
    """Everything a loader needs besides the source (the config's data_* fields and on_bad_row)."""
    preset: str = "auto"
    split: str = "train"
    config: str | None = None          # a Hub dataset's configuration (load_dataset's `name`)
    prompt_field: str | None = None    # None: the preset's
    answer_field: str | None = None
    image_field: str | None = None
    on_bad_row: str = "error"

    @classmethod
    def from_config(cls, cfg) -> "DataOptions":
        return cls(preset=cfg.data_preset, split=cfg.data_split, config=cfg.data_config, prompt_field=cfg.prompt_field,
                   answer_field=cfg.answer_field, image_field=cfg.image_field, on_bad_row=cfg.on_bad_row)

    def row_format(self) -> RowFormat:
        if self.preset not in PRESETS:
            raise ConfigError(f"data_preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        fmt = PRESETS[self.preset]
        renamed = {k: v for k, v in (("prompt_field", self.prompt_field), ("answer_field", self.answer_field),
                                     ("image_field", self.image_field)) if v}
        return replace(fmt, **renamed)


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------
class BadImage(ValueError):
    """An image a row names cannot be used; `reason` is the short form skipped rows are counted by."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason + (f" {detail}" if detail.startswith("(") else f": {detail}" if detail else ""))
        self.reason = reason


class ImageRef:
    """A checked image kept by reference: `source` is a file path or the encoded bytes, `size` its
    (width, height), after `fit_pixels` the size it is resized to. `open()` decodes a fresh PIL image
    and closes the file at once, so rows hold no file descriptors and no decoded pixels."""
    __slots__ = ("source", "size", "resize")

    def __init__(self, source: Path | bytes, size: tuple[int, int], resize: tuple[int, int] | None = None):
        self.source, self.size, self.resize = source, tuple(resize or size), resize

    def open(self):
        try:
            image = _decode(self.source)[0]
        except BadImage as err:  # the file changed after it was checked at load time
            raise ValueError(f"{self!r}: {err}") from None
        return image.convert("RGB").resize(self.resize) if self.resize else image

    def __repr__(self) -> str:
        where = str(self.source) if isinstance(self.source, Path) else f"<{len(self.source)} bytes>"
        return f"ImageRef({where}, size={self.size})"


def _too_large(pixels: int, limit: int) -> BadImage:
    return BadImage("image too large", f"({pixels} pixels; the limit is {limit}, PIL.Image.MAX_IMAGE_PIXELS)")


_BOMB_FILTER = False


def _decode(source: Path | bytes, keep: bool = True):
    """(PIL image fully decoded in memory or None when not `keep`, (width, height)); the file is closed
    on return. Anything wrong with the image raises BadImage."""
    from PIL import Image

    global _BOMB_FILTER
    if not _BOMB_FILTER:  # PIL's over-the-limit warning becomes an error (a bad row), not a stderr line;
        warnings.filterwarnings("error", category=Image.DecompressionBombWarning)  # once: threads decode
        _BOMB_FILTER = True
    limit = Image.MAX_IMAGE_PIXELS or 89_478_485
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            width, height = image.size
            if width * height > limit:
                raise _too_large(width * height, limit)
            image.load()  # a truncated or corrupt file fails here, not in the middle of a training step
            return (image.copy() if keep else None), (width, height)
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        found = re.search(r"\((\d+) pixels\)", str(err))
        raise _too_large(int(found.group(1)) if found else 0, limit) from None
    except FileNotFoundError:
        raise BadImage("image file not found", str(source)) from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, EOFError, ... for broken files
        detail = str(err).splitlines()[0][:120] if str(err) else ""
        raise BadImage("unreadable image", f"({type(err).__name__}{': ' + detail if detail else ''})") from None


def image_source(ref, base_dir: Path) -> Path | bytes:
    """The file path or encoded bytes an image reference names: a path (relative to `base_dir`), a
    file:// URI, a base64 data: URI, bytes, or a Hugging Face Image value {"bytes", "path"}."""
    if isinstance(ref, dict) and ("bytes" in ref or "path" in ref):
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, (bytes, bytearray)) and ref:
        return bytes(ref)
    if not isinstance(ref, str) or not ref:
        raise BadImage("unsupported image reference", f"of type {type(ref).__name__}"
                       if not isinstance(ref, str) else "empty string")
    if ref.startswith("data:"):
        try:
            return base64.b64decode(ref.partition(",")[2], validate=True)
        except ValueError:
            raise BadImage("unreadable image", "(invalid base64 in a data: URI)") from None
    path = Path(ref[len("file://"):] if ref.startswith("file://") else ref).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        raise BadImage("image file not found", str(path))
    return path


def check_image(ref, base_dir: Path):
    """Decode the image once (every pixel, so a truncated file is caught) and return an `ImageRef` to
    it; a PIL image passes through unchanged. Raises BadImage."""
    if hasattr(ref, "size") and hasattr(ref, "convert"):
        return ref
    source = image_source(ref, base_dir)
    return ImageRef(source, _decode(source, keep=False)[1])


def open_image(ref, base_dir: Path):
    """A PIL image, decoded into memory with its file closed, from any reference `image_source` takes,
    an `ImageRef` or a PIL image. Raises ValueError (BadImage) naming the problem."""
    if isinstance(ref, ImageRef):
        return ref.open()
    if hasattr(ref, "size") and hasattr(ref, "convert"):
        return ref
    return _decode(image_source(ref, base_dir))[0]


def resolve_images(images: list) -> list:
    """PIL images for a prompt: `ImageRef`s are decoded now (and resized if `fit_pixels` said so)."""
    return [image.open() if isinstance(image, ImageRef) else image for image in images]


def _fit_size(size: tuple[int, int], min_pixels: int, max_pixels: int) -> tuple[int, int] | None:
    width, height = size
    area = width * height
    if min_pixels <= area <= max_pixels:
        return None
    scale = ((max_pixels if area > max_pixels else min_pixels) / area) ** 0.5
    new = (max(1, int(width * scale)), max(1, int(height * scale)))
    if area < min_pixels:  # rounding down could leave it just under the floor
        while new[0] * new[1] < min_pixels:
            new = (new[0] + 1, new[1] + (new[1] < new[0]))
    return new


def fit_pixels(image, min_pixels: int, max_pixels: int):
    """Resize (keeping the aspect ratio) so that min_pixels <= width * height <= max_pixels. An
    `ImageRef` is not decoded: the returned ref resizes when it is opened."""
    new = _fit_size(image.size, min_pixels, max_pixels)
    if new is None:
        return image
    return ImageRef(image.source, image.size, new) if isinstance(image, ImageRef) else image.convert("RGB").resize(new)


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------
def _type_name(value) -> str:
    return "null" if value is None else type(value).__name__


def _text_of(content, where: str, name: str) -> str:
    """The text of a chat turn's content (a string or a list of items); raises BadRow naming the field."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRow(f"{where}: field '{name}' must be a string or a list of content items, got {_type_name(content)}",
                     "content of the wrong type")
    texts = []
    for j, item in enumerate(content):
        if isinstance(item, dict) and item.get("type") == "text":
            if not isinstance(item.get("text"), str):
                raise BadRow(f"{where}: field '{name}[{j}].text' must be a string, got {_type_name(item.get('text'))}",
                             "content of the wrong type")
            texts.append(item["text"])
    return "".join(texts)


def _answer_of(row: dict, where: str, key: str) -> str:
    answer = row.get(key)
    if isinstance(answer, bool) or (answer is not None and not isinstance(answer, (str, int, float))):
        raise BadRow(f"{where}: field '{key}' must be a string or a number, got {_type_name(answer)}",
                     f"field '{key}' of the wrong type")
    if answer is None or not str(answer).strip():
        raise BadRow(f"{where}: field '{key}' is missing or empty")
    return str(answer)


def _gold_after(answer: str, marker: str, where: str, key: str) -> str:
    """GSM8K's gold: the number after the solution's last `####`, without thousands separators."""
    position = answer.rfind(marker)
    gold = answer[position + len(marker):].strip().replace(",", "") if position >= 0 else ""
    if not gold:
        raise BadRow(f"{where}: field '{key}' has no final '{marker} N' line", f"field '{key}' without {marker}")
    return gold


def _sokoban_level(row: dict, where: str, base_dir: Path) -> str:
    """The level an LMM-R1 Sokoban row's env_path names, as text rows joined by '/': gym-sokoban's
    saved `room_state` (.npy: 0 wall, 1 floor, 2 target, 3 box on target, 4 box, 5 player) or text."""
    from .sokoban import parse_level

    env_path = row.get("env_path")
    if not isinstance(env_path, str) or not env_path:
        raise BadRow(f"{where}: field 'env_path' is missing (Sokoban rows name their level file)"
                     if env_path in (None, "") else f"{where}: field 'env_path' must be a string, got {_type_name(env_path)}")
    level_path = Path(env_path[len("file://"):] if env_path.startswith("file://") else env_path)
    level_path = level_path if level_path.is_absolute() else base_dir / level_path
    if not level_path.is_file():
        raise BadRow(f"{where}: field 'env_path': level file not found: {level_path}", "level file not found")
    try:
        if level_path.suffix == ".npy":
            import numpy as np
            room = np.load(level_path, allow_pickle=False)
            if room.ndim != 2 or room.size == 0 or room.min() < 0 or room.max() > 5:
                raise ValueError(f"expected a 2-D room_state of codes 0-5, got shape {room.shape}")
            level = "/".join("".join("# .*$@"[int(v)] for v in line) for line in room.tolist())
            if level.count("$") + level.count("*") == level.count(".") + level.count("*") + 1:
                level = level.replace("@", "+")  # room_state shows the player, not the target under it
        else:
            level = level_path.read_text(encoding="utf-8").strip("\n").replace("\n", "/")
        parse_level(level)
    except (ValueError, IndexError, OSError) as err:
        raise BadRow(f"{where}: field 'env_path': not a Sokoban level ({type(err).__name__}: {str(err)[:100]})",
                     "unreadable Sokoban level") from None
    return level


def _parse_lmmr1(row: dict, where: str) -> tuple[str, str | None, list[tuple[str, object]]]:
    """(prompt, system, [(field name, image reference)]) of an LMM-R1 row."""
    message = row.get("message")
    if isinstance(message, str):
        try:
            message = json.loads(message)
        except json.JSONDecodeError as err:
            raise BadRow(f"{where}: field 'message' is not valid JSON ({err.msg})") from None
    if message is None:
        raise BadRow(f"{where}: field 'message' is missing (LMM-R1 rows hold their chat turns there)")
    if not isinstance(message, list) or not message:
        raise BadRow(f"{where}: field 'message' must be a list of chat turns, got "
                     f"{'an empty list' if message == [] else _type_name(message)}")
    system, user, user_at = None, None, None
    for i, turn in enumerate(message):
        if not isinstance(turn, dict):
            raise BadRow(f"{where}: field 'message[{i}]' must be an object with 'role' and 'content', got {_type_name(turn)}",
                         "chat turn of the wrong type")
        if turn.get("role") == "system" and system is None:
            system = _text_of(turn.get("content", ""), where, f"message[{i}].content")
        elif turn.get("role") == "user" and user is None:
            user, user_at = turn, i
    if user is None:
        raise BadRow(f"{where}: field 'message' has no user turn")
    name = f"message[{user_at}].content"
    content = user.get("content")
    if not isinstance(content, (str, list)):
        raise BadRow(f"{where}: field '{name}' must be a string or a list of content items, got {_type_name(content)}",
                     "content of the wrong type")
    texts, images = [], []
    for j, item in enumerate([content] if isinstance(content, str) else content):
        kind = item.get("type") if isinstance(item, dict) else None
        if isinstance(item, str):
            texts.append(item)
        elif kind == "text":
            if not isinstance(item.get("text"), str):
                raise BadRow(f"{where}: field '{name}[{j}].text' must be a string, got {_type_name(item.get('text'))}",
                             "content of the wrong type")
            texts.append(item["text"])
        elif kind in ("image", "image_url"):
            ref = item.get(kind)
            if kind == "image_url" and isinstance(ref, dict):  # OpenAI style {"image_url": {"url": ...}}
                ref = ref.get("url")
            if ref is None:
                raise BadRow(f"{where}: field '{name}[{j}].{kind}' is missing", "image item without an image")
            images.append((f"{name}[{j}].{kind}", ref))
        elif isinstance(item, dict):
            raise BadRow(f"{where}: field '{name}[{j}]' has an unsupported content type {kind!r}",
                         "unsupported content type")
        else:
            raise BadRow(f"{where}: field '{name}[{j}]' must be a content object or a string, got {_type_name(item)}",
                         "content of the wrong type")
    prompt = "".join(texts)
    if not prompt.strip():
        raise BadRow(f"{where}: field '{name}' has no text", "prompt missing or empty")
    return prompt, system, images


def _parse(row, where: str, base_dir: Path, fmt: RowFormat) -> tuple[Example, list[tuple[str, object]]]:
    """One row as an Example whose images are still unchecked references, with their field names."""
    if not isinstance(row, dict):
        raise BadRow(f"{where}: expected a JSON object, got {_type_name(row)}", "row is not an object")
    kind = fmt.kind if fmt.kind != "auto" else "lmmr1" if "message" in row else "plain"
    meta = {}
    if kind == "lmmr1":
        prompt, system, images = _parse_lmmr1(row, where)
        if row.get("env_path") or fmt.needs_env:
            meta["level"] = _sokoban_level(row, where, base_dir)  # the level travels in the example
            answer = str(row.get(fmt.answer_field) or "")  # LMM-R1's Sokoban rows leave the answer empty
        else:
            answer = _answer_of(row, where, fmt.answer_field)
    else:
        key = fmt.prompt_field
        if fmt.kind == "auto" and key not in row:
            keys = ", ".join(list(map(str, row))[:8]) or "none"
            raise BadRow(f"{where}: neither a 'message' (LMM-R1) nor a {key!r} field (row keys: {keys}; "
                         "see --data-preset and --prompt-field)", "neither a 'message' nor a prompt field")
        prompt, system = row.get(key), None
        if prompt is not None and not isinstance(prompt, str):
            raise BadRow(f"{where}: field '{key}' must be a string, got {_type_name(prompt)}", f"field '{key}' of the wrong type")
        if not prompt or not prompt.strip():
            raise BadRow(f"{where}: field '{key}' is missing or empty")
        if isinstance(row.get("level"), str) and row["level"]:  # `data generate --task sokoban` rows
            meta["level"], answer = row["level"], str(row.get(fmt.answer_field) or "")
        else:
            answer = _answer_of(row, where, fmt.answer_field)
        if fmt.gold_after is not None:
            answer = _gold_after(answer, fmt.gold_after, where, fmt.answer_field)
        value, name = row.get(fmt.image_field), fmt.image_field
        if value is None:
            images = []
        elif isinstance(value, list):
            images = [(f"{name}[{k}]", ref) for k, ref in enumerate(value)]
        elif isinstance(value, (str, bytes, dict)) or hasattr(value, "convert"):
            images = [(name, value)]
        else:
            raise BadRow(f"{where}: field '{name}' must be an image reference or a list of them, got {_type_name(value)}",
                         f"field '{name}' of the wrong type")
    if "solution" in row:
        meta["solution"] = row["solution"]
    return Example(prompt=prompt, answer=answer, images=[ref for _, ref in images], system=system, meta=meta), images


def _check(job: tuple[str, str, object, Path]):
    """An `ImageRef` (or PIL image) for one image reference of a row, or the BadRow naming it."""
    where, name, ref, base_dir = job
    try:
        return check_image(ref, base_dir)
    except BadImage as err:
        return BadRow(f"{where}: field '{name}': {err}", err.reason)


def parse_row(row, where: str, base_dir: Path, fmt: RowFormat = PRESETS["auto"]) -> Example:
    """One row of any format, every image decoded once and kept as an `ImageRef`; raises BadRow naming
    `where` (file:line) and the field."""
    example, images = _parse(row, where, base_dir, fmt)
    checked = [_check((where, name, ref, base_dir)) for name, ref in images]
    bad = next((c for c in checked if isinstance(c, BadRow)), None)
    if bad is not None:
        raise bad
    example.images = checked
    return example


# ---------------------------------------------------------------------------------------------
# Sources: files, folders, save_to_disk datasets, Hub ids
# ---------------------------------------------------------------------------------------------
DATA_SUFFIXES = (".jsonl", ".ndjson", ".json", ".parquet", ".pq")
SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")
_METADATA = {"dataset_info.json", "dataset_infos.json", "state.json", "dataset_dict.json"}


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}{': ' + text[:160] if text else ''}"


def _not_utf8(path: Path, data: bytes, err: UnicodeDecodeError, line_no: int | None = None) -> str:
    if line_no is None:
        line_no = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
    else:
        column = err.start + 1
    return (f"{path}:{line_no}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
            "re-save the file as UTF-8")


def _jsonl_rows(path: Path):
    with path.open("rb") as handle:
        for line_no, raw in enumerate(handle, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as err:
                yield where, BadRow(_not_utf8(path, raw, err, line_no), "not UTF-8 text")
                continue
            if not line.strip():
                continue
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                yield where, BadRow(f"{where}: invalid JSON ({err.msg})")


def _json_rows(path: Path):
    """A .json file: a JSON array of row objects, or (as often on the Hub) JSON Lines."""
    data = path.read_bytes()
    if not data.lstrip()[:1] == b"[":
        if data.strip().count(b"\n"):  # several lines: JSON Lines, unless the whole file is one object
            try:
                whole = json.loads(data.decode("utf-8-sig"))
            except ValueError:
                whole = None
            if isinstance(whole, dict):
                raise ConfigError(f"{path}: one JSON object (keys: {', '.join(list(whole)[:8])}); expected a JSON "
                                  "array of row objects or JSON Lines")
        yield from _jsonl_rows(path)
        return
    try:
        rows = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise ConfigError(_not_utf8(path, data, err)) from None
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}:{err.lineno}: invalid JSON at column {err.colno} ({err.msg})") from None
    for i, row in enumerate(rows):
        yield f"{path}:row {i}", row


def _parquet_rows(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"{path}: parquet needs pyarrow (pip install pyarrow, or datasets)") from None
    try:
        handle = pq.ParquetFile(path)
    except Exception as err:  # ArrowInvalid: not parquet, or a corrupt footer
        raise ConfigError(f"{path}: not a readable parquet file ({_short(err)})") from None
    with handle:
        i = 0
        try:
            for batch in handle.iter_batches(batch_size=1024):
                for row in batch.to_pylist():
                    yield f"{path}:row {i}", row
                    i += 1
        except Exception as err:  # ArrowInvalid, ArrowIOError, ...: a corrupt row group
            raise ConfigError(f"{path}:row {i}: unreadable parquet data ({_short(err)})") from None


def _dataset_rows(dataset, name: str):
    """Rows of a `datasets.Dataset` as plain Python values, images left encoded ({"bytes", "path"})."""
    i = 0
    for table in dataset.with_format("arrow").iter(batch_size=1024):
        for row in table.to_pylist():
            yield f"{name}:row {i}", row
            i += 1


def _pick_split(dataset, name: str, split: str):
    if hasattr(dataset, "keys"):  # a DatasetDict
        if split not in dataset:
            raise ConfigError(f"{name}: no {split!r} split (splits: {', '.join(dataset)}; set data_split)")
        return dataset[split]
    return dataset


def _saved_dataset_rows(path: Path, split: str):
    try:
        from datasets import load_from_disk
    except ImportError:
        raise ConfigError(f"{path}: a datasets directory needs the `datasets` package (pip install datasets)") from None
    try:
        dataset = load_from_disk(str(path))
    except Exception as err:
        raise ConfigError(f"{path}: not a readable save_to_disk dataset ({_short(err)})") from None
    yield from _dataset_rows(_pick_split(dataset, str(path), split), str(path))


def _split_of(file: Path, root: Path) -> str | None:
    """The split a data file belongs to by its name (train.jsonl, train-00000-of-00002.parquet) or folder."""
    parts = [p.lower() for p in file.relative_to(root).parts]
    for name in SPLIT_NAMES:
        if re.split(r"[-_.]", parts[-1])[0] == name or name in parts[:-1]:
            return name
    return None


def _folder_files(path: Path, split: str) -> list[Path]:
    files = sorted(f for f in path.rglob("*") if f.suffix.lower() in DATA_SUFFIXES and f.is_file()
                   and f.name not in _METADATA and not any(p.startswith(".") for p in f.relative_to(path).parts))
    if not files:
        raise ConfigError(f"{path}: no data files there (looked for {', '.join('*' + s for s in DATA_SUFFIXES)} "
                          "or a save_to_disk dataset)")
    splits = {f: _split_of(f, path) for f in files}
    if not any(splits.values()):
        return files  # files not named by split: all of them are the data
    chosen = [f for f in files if splits[f] == split.lower()]
    if not chosen:
        found = sorted({s for s in splits.values() if s})
        raise ConfigError(f"{path}: no {split!r} data files there (files for {', '.join(found)}; set data_split)")
    return chosen


def _file_rows(path: Path):
    suffix = path.suffix.lower()
    with path.open("rb") as handle:
        head = handle.read(4)
    if suffix in (".parquet", ".pq") or (suffix not in (".jsonl", ".ndjson", ".json") and head == b"PAR1"):
        return _parquet_rows(path)
    if suffix == ".json" or (suffix not in (".jsonl", ".ndjson") and head.lstrip()[:1] == b"["):
        return _json_rows(path)
    return _jsonl_rows(path)


HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def looks_like_hub_id(data: str) -> bool:
    """`org/name` that is not a local path: no data-file suffix, not ./, / or ~."""
    return (bool(HUB_ID.fullmatch(data)) and not Path(data).exists()
            and Path(data).suffix.lower() not in DATA_SUFFIXES + (".arrow", ".csv", ".txt"))


def _hub_rows(repo_id: str, options: DataOptions):
    split = options.split
    name = f"{repo_id}[{split}]" if options.config is None else f"{repo_id}[{options.config}/{split}]"
    need = (f"data {repo_id!r}: needs the network or a local copy (no local file or folder of that name; {{why}}; "
            f"`hf download {repo_id} --repo-type dataset --local-dir DIR` then --data DIR, or save_to_disk, "
            "or a local file)")
    offline = hub.offline()
    if not offline and not hub.hub_reachable():
        raise ConfigError(need.format(why=f"{hub.endpoint()} is unreachable; a cached copy loads with HF_HUB_OFFLINE=1"))
    try:
        import datasets
    except ImportError:
        raise ConfigError(f"data {repo_id!r}: a Hub dataset needs the `datasets` package (pip install datasets)") from None
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()
    try:
        dataset = datasets.load_dataset(repo_id, name=options.config, split=split)
    except ConnectionError:
        raise ConfigError(need.format(why="HF_HUB_OFFLINE is set and it is not in the cache" if offline
                                      else "the Hub did not answer")) from None
    except Exception as err:
        kind = type(err).__name__
        if kind in ("DatasetNotFoundError", "RepositoryNotFoundError", "FileNotFoundError"):
            if offline:
                raise ConfigError(need.format(why="HF_HUB_OFFLINE is set and it is not in the cache")) from None
            raise ConfigError(f"data {repo_id!r}: no such dataset on the Hub, or it is gated or private "
                              "(`hf auth login`)") from None
        hint = "; set data_config" if "config" in str(err).lower() else "; set data_split" if "split" in str(err).lower() else ""
        raise ConfigError(f"data {repo_id!r}: could not load it ({_short(err)}{hint})") from None
    finally:
        datasets.logging.set_verbosity(verbosity)
    yield from _dataset_rows(dataset, name)


def _source_rows(data: str | Path, options: DataOptions):
    """(where, row or BadRow, base folder of relative paths) for every row of `data`."""
    path = Path(data)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            for where, row in _saved_dataset_rows(path, options.split):
                yield where, row, path
            return
        files = _folder_files(path, options.split)
    elif path.is_file():
        files = [path]
    elif looks_like_hub_id(str(data)):
        for where, row in _hub_rows(str(data), options):
            yield where, row, Path.cwd()
        return
    else:
        raise ConfigError(f"data {str(data)!r}: no such file or directory (nor a Hub dataset id org/name)")
    for file in files:
        try:
            for where, row in _file_rows(file):
                yield where, row, file.parent
        except OSError as err:  # unreadable: permissions, a vanished file, an I/O error
            raise ConfigError(f"{file}: cannot read it ({err.strerror or _short(err)})") from None


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
CHUNK_ROWS = 256  # rows parsed, then their images decoded in parallel, at a time


def _chunks(items, size: int):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def load_rows(data: str | Path, on_bad_row: str | None = None,
              options: DataOptions | None = None) -> tuple[list[Example], LoadReport]:
    """All usable rows of a file, folder, save_to_disk dataset or Hub id. A bad row raises ConfigError
    (one line: file, row, field) when on_bad_row is 'error'; with 'skip' it is counted by reason in the
    report. `on_bad_row`, when given, overrides `options.on_bad_row`. Every image is decoded once here
    (in threads, a few files open at a time) and kept as an `ImageRef`."""
    options = options or DataOptions()
    if on_bad_row is not None:
        options = replace(options, on_bad_row=on_bad_row)
    if options.on_bad_row not in ("error", "skip"):
        raise ConfigError(f"on_bad_row must be 'error' or 'skip', got {options.on_bad_row!r}")
    fmt = options.row_format()
    examples, report = [], LoadReport()

    def bad(err: BadRow) -> None:
        if options.on_bad_row == "error":
            raise ConfigError(f"{err} (use --on-bad-row skip to skip such rows)")
        report.skipped[err.reason] += 1

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for chunk in _chunks(_source_rows(data, options), CHUNK_ROWS):
            parsed, jobs = [], []
            for where, row, base_dir in chunk:
                try:
                    if isinstance(row, BadRow):
                        raise row
                    example, images = _parse(row, where, base_dir, fmt)
                    parsed.append((example, len(images)))
                    jobs.extend((where, name, ref, base_dir) for name, ref in images)
                except BadRow as err:
                    parsed.append((err, 0))
            checked = iter(list(pool.map(_check, jobs)))
            for item, n_images in parsed:
                if isinstance(item, BadRow):
                    bad(item)
                    continue
                images = [next(checked) for _ in range(n_images)]
                failed = next((image for image in images if isinstance(image, BadRow)), None)
                if failed is not None:
                    bad(failed)
                    continue
                item.images = images
                examples.append(item)
    # gold answers the verifier cannot parse would pay nobody (LMM-R1 pays them 1.0): skip and count
    ok = gold_parseable(examples)
    if ok.count(False):
        report.skipped["gold answer not parseable"] += ok.count(False)
    examples = [e for e, good in zip(examples, ok) if good]
    report.rows = len(examples)
    if not examples:
        raise ConfigError(f"{data}: no usable rows ({report.line()})")
    return examples, report


def load_splits(cfg) -> tuple[list[Example], list[Example], LoadReport]:
    """Train and held-out rows for a TrainConfig (data, train_size, eval_size, seed, on_bad_row and the
    data_* / *_field settings). A task name gives generated train/test splits; data rows are split 90/10
    (test capped at eval_size)."""
    data, options = cfg.data, DataOptions.from_config(cfg)
    train_size, test_size, seed = cfg.train_size, cfg.eval_size, cfg.seed
    if data in TASKS:
        train, test = generate(data, train_size, test_size, seed, cfg.task_level)
        return train, test, LoadReport(rows=len(train) + len(test))
    if not Path(data).exists() and not looks_like_hub_id(data):
        raise ConfigError(f"data: {data!r} is neither a task ({', '.join(TASKS)}) nor an existing file or directory "
                          "(nor a Hub dataset id org/name)")
    rows, report = load_rows(data, options=options)
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_test = min(test_size, len(rows) // 10)
    return [rows[i] for i in order[n_test:]], [rows[i] for i in order[:n_test]], report


def _messages(example: Example, system_prompt: str, prompt_template: str, images: list) -> list[dict]:
    system = example.system if example.system is not None else system_prompt
    text = prompt_template.replace("{prompt}", example.prompt)
    messages = [{"role": "system", "content": system}] if system else []
    if images:
        content = [{"type": "image", "image": image} for image in images]
        content.append({"type": "text", "text": text})
        messages.append({"role": "user", "content": content})
    else:
        messages.append({"role": "user", "content": text})
    return messages


def build_messages(example: Example, system_prompt: str = "", prompt_template: str = "{prompt}") -> list[dict]:
    """OpenAI-style chat messages: optional system turn (the row's own wins), then the user turn
    (images first, as PIL images decoded now, then the prompt text wrapped by `prompt_template`)."""
    return _messages(example, system_prompt, prompt_template, resolve_images(example.images))


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
    messages = _messages(example, system_prompt, prompt_template, example.images)  # the template reads no pixels
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_tokens = sum(max(1, round(im.size[0] * im.size[1] / IMAGE_TOKEN_PIXELS)) for im in example.images)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + image_tokens


def prepare(examples: list[Example], tokenizer, system_prompt: str, max_prompt_tokens: int,
            min_pixels: int, max_pixels: int, report: LoadReport | None = None,
            prompt_template: str = "{prompt}") -> list[Example]:
    """Resize images into [min_pixels, max_pixels] and drop (and count) prompts over max_prompt_tokens:
    a prompt is never truncated, so image tokens can never be cut. `ImageRef`s stay undecoded: they
    resize when a prompt is built."""
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

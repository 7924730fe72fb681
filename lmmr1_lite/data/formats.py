"""Row formats: what a row looks like (LMM-R1 chat rows, plain prompt/answer rows, Sokoban levels), the
presets that name a format and its field names (`data_preset`), the loader's options, and the parsing
of one row into an `Example` with one-line errors naming file, row and field."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from ..config import DATA_PRESETS, ConfigError
from ..example import Example
from .images import BadImage, check_image


class BadRow(ValueError):
    """A row that cannot be used; str() is the one-line message naming file, row and field, `reason`
    the short form that skipped rows are counted by."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message.split(": ", 1)[-1].split(" (")[0].split(":")[0]


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
    from ..sokoban import parse_level

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

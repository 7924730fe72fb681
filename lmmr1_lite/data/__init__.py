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

Modules, one job each: `images` (checking, keeping and resizing images), `formats` (row formats,
presets, options, parsing one row), `sources` (files, folders, parquet, save_to_disk, the Hub),
`loading` (`load_rows`, `load_splits`) and `prompts` (chat messages, prompt length, `prepare`).
Every public name is importable from `lmmr1_lite.data` itself.
"""
from ..example import Example
from .formats import PRESETS, BadRow, DataOptions, RowFormat, parse_row
from .images import BadImage, ImageRef, check_image, fit_pixels, image_source, open_image, resolve_images
from .loading import CHUNK_ROWS, LoadReport, load_rows, load_splits
from .prompts import IMAGE_TOKEN_PIXELS, answer_kind, build_messages, prepare, prompt_tokens
from .sources import DATA_SUFFIXES, HUB_ID, SPLIT_NAMES, looks_like_hub_id

__all__ = ["CHUNK_ROWS", "DATA_SUFFIXES", "HUB_ID", "IMAGE_TOKEN_PIXELS", "PRESETS", "SPLIT_NAMES", "BadImage",
           "BadRow", "DataOptions", "Example", "ImageRef", "LoadReport", "RowFormat", "answer_kind", "build_messages",
           "check_image", "fit_pixels", "image_source", "load_rows", "load_splits", "looks_like_hub_id", "open_image",
           "parse_row", "prepare", "prompt_tokens", "resolve_images"]

"""Benchmark rows from a local copy in a published format, or from the Hub by id.

Local formats: JSONL, a JSON array, parquet (the Hub's own files, read with pyarrow: an Image column arrives
as {"bytes", "path"}), or a `datasets.save_to_disk` directory (Image columns are cast to decode=False, so no
image is decoded before it is used). A row that lacks a column its benchmark needs stops the load with one
line naming the file, the row and the column.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..config import ConfigError


def _read_file(path: Path) -> list:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    text = path.read_text(encoding="utf-8")
    if suffix == ".json" or text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(rows, list):
            raise ConfigError(f"{path}: expected a JSON array of rows, got {type(rows).__name__}")
        return rows
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None
    return rows


def _undecoded(dataset):
    """The dataset with every Image column left as {"bytes", "path"} (decoded lazily, row by row, later)."""
    from datasets import Image

    for column, feature in dataset.features.items():
        if isinstance(feature, Image):
            dataset = dataset.cast_column(column, Image(decode=False))
    return dataset


def _pick_split(dataset, where: str, split: str):
    if not hasattr(dataset, "keys"):
        return dataset
    if split in dataset:
        return dataset[split]
    if len(dataset) == 1:
        return next(iter(dataset.values()))
    raise ConfigError(f"{where}: no split {split!r} (has {', '.join(dataset)}); pass split=")


def _read_dir(path: Path, split: str) -> list:
    try:
        from datasets import load_from_disk
    except ImportError:
        raise ConfigError(f"{path}: a datasets directory needs the `datasets` package (pip install datasets)") from None
    return list(_undecoded(_pick_split(load_from_disk(str(path)), str(path), split)))


def _read_hub(hub_id: str, config: str | None, split: str) -> list:
    """`datasets.load_dataset`; any failure to reach the Hub becomes one line naming the fix."""
    from .. import hub

    if not hub.offline() and not hub.hub_reachable():  # seconds, not a page of retries
        raise ConfigError(f"{hub_id}: {hub.endpoint()} cannot be reached; a Hub benchmark needs the network or a "
                          f"local copy (`hf download {hub_id} --repo-type dataset`, then --data DIR)")
    try:
        from datasets import load_dataset
        dataset = load_dataset(hub_id, config, split=split)
    except Exception as err:  # noqa: BLE001 - offline, unknown id, gated: all mean "get a local copy"
        raise ConfigError(f"{hub_id}: loading from the Hub failed ({type(err).__name__}); it needs the network "
                          "or a local copy (JSONL, JSON, parquet or a save_to_disk directory)") from None
    return list(_undecoded(dataset))


def load_rows(name: str, path: str | Path | None = None, split: str | None = None) -> list[dict]:
    """All rows of benchmark `name`, as published, from a local file/directory at `path`, or from the Hub
    (`path` None, or a Hub id such as "AI4Math/MathVista" that is not a local path).

    Sokoban rows given as `env_path` get the level file's text as `level` (the path is relative to the
    data file's folder), so that scoring needs no file."""
    from . import get

    bench = get(name)
    split = split or bench.split
    local = Path(path) if path is not None else None
    if local is not None and local.exists():
        rows = _read_dir(local, split) if local.is_dir() else _read_file(local)
        where, base = str(local), local if local.is_dir() else local.parent
    elif path is None or ("/" in str(path) and not str(path).startswith((".", "/", "~"))):
        hub_id = str(path or bench.hub_id or "")
        if not hub_id:
            raise ConfigError(f"benchmark {name}: no Hub copy; give a local file")
        config = bench.config if hub_id == bench.hub_id else None
        rows, where, base = _read_hub(hub_id, config, split), hub_id, Path(".")
    else:
        raise ConfigError(f"{path}: no such file or directory")
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: row {index}: expected an object, got {type(row).__name__}")
        column = bench.missing(row)
        if column is not None:
            raise ConfigError(f"{where}: row {index}: missing column {column!r} (benchmark {name} needs "
                              f"{', '.join(bench.required) or column})")
        if name == "sokoban" and not row.get("level"):
            level_file = Path(row["env_path"]) if Path(row["env_path"]).is_absolute() else base / row["env_path"]
            if not level_file.is_file():
                raise ConfigError(f"{where}: row {index}: env_path: level file not found: {level_file}")
            row["level"] = level_file.read_text()
    if not rows:
        raise ConfigError(f"{where}: no rows")
    return rows

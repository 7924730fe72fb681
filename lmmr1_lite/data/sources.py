"""Where rows come from: JSON Lines, JSON arrays and parquet files, folders of data files (picked by
split), `datasets.save_to_disk` folders, and Hugging Face Hub dataset ids. Each source yields
`(where, row or BadRow)`; `where` names the file and row for error messages."""
from __future__ import annotations

import json
import re
from pathlib import Path

from .. import hub
from ..config import ConfigError
from .formats import BadRow, DataOptions


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

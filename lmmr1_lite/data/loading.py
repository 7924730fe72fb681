"""Loading: rows from a source, parsed by their format, their images checked in threads; bad rows
raise one line or are counted (`on_bad_row`); a task name or data rows split into train and test."""
from __future__ import annotations

import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..config import ConfigError
from ..example import Example
from ..rewards import gold_parseable
from ..tasks import TASKS, generate
from .formats import BadRow, DataOptions, _check, _parse
from .sources import _source_rows, looks_like_hub_id


@dataclass
class LoadReport:
    rows: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> count

    def line(self) -> str:
        reasons = ", ".join(f"{n} {r}" for r, n in self.skipped.most_common())
        return f"{self.rows} rows loaded" + (f", {sum(self.skipped.values())} skipped ({reasons})" if self.skipped else "")


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

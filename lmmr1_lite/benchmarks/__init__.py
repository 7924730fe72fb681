"""The paper's evaluation benchmarks, one module each: rows read as published, prompts built as the
benchmark's reference evaluation builds them, answers scored by the benchmark's own rule.

    from lmmr1_lite import benchmarks
    rows = benchmarks.load_rows("mathvista", "data/mathvista_testmini.parquet")
    bench = benchmarks.get("mathvista")
    example = bench.to_example(rows[0], mode="cot", base_dir="data")   # or mode="lmmr1"
    scores = bench.score_batch(rows, completions)                      # 1.0 / 0.0 each

Each module's docstring names the dataset, its columns, the prompt and the scoring rule, with the
official code it follows.
"""
from __future__ import annotations

from . import gpqa, gsm8k, math500, mathverse, mathvision, mathvista, mmstar, olympiadbench, sokoban
from .base import MODES, Benchmark, Check
from .loading import load_rows

_MODULES = (math500, gpqa, olympiadbench, mathvision, mathverse, mmstar, mathvista, sokoban, gsm8k)
BENCHMARKS: dict[str, Benchmark] = {module.BENCHMARK.name: module.BENCHMARK for module in _MODULES}
NAMES: tuple[str, ...] = tuple(BENCHMARKS)

__all__ = ["BENCHMARKS", "MODES", "NAMES", "Benchmark", "Check", "get", "load_rows", "score"]


def get(name: str) -> Benchmark:
    """The registered benchmark `name`; ConfigError (one line) naming the choices when unknown."""
    from ..config import ConfigError

    if name not in BENCHMARKS:
        raise ConfigError(f"benchmark {name!r} is not registered; choose one of {', '.join(NAMES)}")
    return BENCHMARKS[name]


def score(name: str, row: dict, completion: str) -> float:
    """1.0 when `completion` answers `row` (one row of benchmark `name`, as published) correctly, else 0.0."""
    return get(name).score(row, completion)

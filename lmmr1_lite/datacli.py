"""`lmmr1-lite data validate FILE` and `lmmr1-lite data generate --task NAME ...`."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from .config import TINY_MODEL_DIR, ConfigError
from .data import PRESETS, DataOptions, answer_kind, load_rows, prompt_tokens


def add_parsers(sub) -> None:
    from .tasks import TASKS

    data = sub.add_parser("data", help="validate or generate training data")
    verbs = data.add_subparsers(dest="data_command", required=True)
    validate = verbs.add_parser("validate", help="check a data file, folder, save_to_disk dataset or Hub id and "
                                                 "summarise it (every image is decoded)")
    validate.add_argument("file", help="JSONL, JSON array, parquet, a folder of those, a save_to_disk dataset, "
                                       "or a Hub dataset id org/name")
    validate.add_argument("--data-preset", default="auto", choices=list(PRESETS),
                          help="row format and field names (as the config field data_preset)")
    validate.add_argument("--data-split", default="train", help="split of a Hub dataset, DatasetDict or folder")
    validate.add_argument("--data-config", default=None, help="Hub dataset configuration")
    validate.add_argument("--prompt-field", default=None, help="key of the prompt text (default: the preset's)")
    validate.add_argument("--answer-field", default=None, help="key of the gold answer (default: the preset's)")
    validate.add_argument("--image-field", default=None, help="key of the image(s) (default: the preset's)")
    validate.add_argument("--on-bad-row", choices=["error", "skip"], default="skip",
                          help="stop at the first bad row, or skip and count (default: skip, to see them all)")
    validate.add_argument("--tokenizer", default=str(TINY_MODEL_DIR),
                          help="model dir or Hub id whose tokenizer counts prompt tokens (default: the tiny one)")
    validate.add_argument("--system-prompt", default="", help="system prompt included in the token count")
    generate = verbs.add_parser("generate", help="write a generated task as train/test JSONL (+ images/)")
    generate.add_argument("--task", required=True, choices=sorted(TASKS))
    generate.add_argument("--n", type=int, required=True, help="train rows")
    generate.add_argument("--test-n", type=int, default=None, help="test rows (default: n // 10, at least 1)")
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--level", type=int, default=1, choices=[1, 2, 3], help="difficulty")
    generate.add_argument("--out", required=True, help="output directory (must not hold train.jsonl already)")


def run(args) -> int:
    if args.data_command == "validate":
        options = DataOptions(preset=args.data_preset, split=args.data_split, config=args.data_config,
                              prompt_field=args.prompt_field, answer_field=args.answer_field,
                              image_field=args.image_field, on_bad_row=args.on_bad_row)
        return validate(args.file, options, args.tokenizer, args.system_prompt)
    return generate(args.task, args.n, args.test_n, args.seed, args.level, Path(args.out))


def percentiles(values: list[int]) -> str:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return f"p50 {pick(0.5)}, p90 {pick(0.9)}, p99 {pick(0.99)}, max {ordered[-1]}"


def validate(path: str, options: DataOptions, tokenizer_name: str, system_prompt: str) -> int:
    from .models import load_tokenizer

    rows, report = load_rows(path, options=options)
    tokenizer = load_tokenizer(tokenizer_name)
    lengths = [prompt_tokens(e, tokenizer, system_prompt) for e in rows]
    kinds = Counter(answer_kind(e) for e in rows)
    print(f"{path}: {report.line()}")
    for reason, count in report.skipped.most_common():
        print(f"  skipped {count:>6}  {reason}")
    print(f"  images: {sum(len(e.images) for e in rows)} in {sum(bool(e.images) for e in rows)} rows")
    print("  answer types: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    print(f"  prompt tokens ({Path(tokenizer_name).name} tokenizer, images included): {percentiles(lengths)}")
    return 0


def generate(task: str, n: int, test_n: int | None, seed: int, level: int, out: Path) -> int:
    from .tasks import generate as draw

    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: exists and is not a directory; choose another --out")
    if (out / "train.jsonl").exists():
        raise ConfigError(f"{out}: already holds train.jsonl; choose another --out")
    if n < 1:
        raise ConfigError("--n must be >= 1")
    train, test = draw(task, n, max(1, n // 10) if test_n is None else test_n, seed, level)
    try:
        _write(out, train, test)
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write there ({err.strerror or type(err).__name__})") from None
    print(f"{task}: {len(train)} train and {len(test)} test rows (seed {seed}, level {level}) in {out}")
    return 0


def _write(out: Path, train: list, test: list) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", train), ("test", test)):
        lines = []
        for i, example in enumerate(rows):
            row = {"prompt": example.prompt, "answer": example.answer, **example.meta}
            if example.images:
                (out / "images").mkdir(exist_ok=True)
                row["images"] = []
                for k, image in enumerate(example.images):
                    name = f"images/{split}-{i:06d}-{k}.png"
                    image.save(out / name)
                    row["images"].append(name)
            lines.append(json.dumps(row))
        (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")

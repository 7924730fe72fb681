"""The host's work in one decode step: the ops torch dispatches per step, per decoder layer and for the rest,
for each way the rollouts can run the LoRA.

On a GPU a small model's eager decode step waits on the host (the H200's 3B step kept the GPU 14 % busy,
bench/RESULTS.md), so its time follows the ops dispatched more than the FLOPs. This counts them on any device
(torch.profiler; every `aten::` op, views included, as `bench/e2e_step.py`'s profiles count them) for the architecture cut to 1 and to 2
decoder layers, each generating 2 and 6 new tokens: the differences give the ops of one decode step in one
layer and in everything else (embedding, masks, final norm, LM head, the sampler, the loop), and from them the
whole model's. Modes: the LoRA side path through peft's fp32 casts (`lora_autocast` off), the side path in
bf16 (`lora_autocast`, the training step's rollouts), merged copies (`merge_for_rollouts`). Random weights,
bf16, the dynamic cache, one prompt x `--rows` completions.

    python bench/decode_dispatches.py --config configs/qwen2_5_vl_3b/fre.yaml --model configs/models/qwen2_5_vl_3b \
        --tokenizer QWEN_TOKENIZER_DIR                              # the 3B's layers, NF4 as configured
Writes bench/out/decode_dispatches.json (or --out) and prints it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_step import first_layers_of, profiled, write_report  # noqa: E402

MODES = {"side path, peft's fp32 casts": dict(lora_autocast=False, merged=False),
         "side path in bf16 (lora_autocast)": dict(lora_autocast=True, merged=False),
         "merged copies (merge_for_rollouts)": dict(lora_autocast=False, merged=True)}
PROMPT = [[{"role": "user", "content": "What is 12 times 7? Think step by step."}]]


def dispatches(policy, tokenizer, new_tokens: int, rows: int, lora_autocast: bool, merged: bool) -> int:
    """`aten::` ops dispatched while generating `new_tokens` tokens for `rows` rows (e2e_step's `profiled`, after
    one unprofiled run: the first call's one-time work is not a step's)."""
    from lmmr1_lite.rollout import adapter_merged, generate

    def run():
        generate(policy, tokenizer, PROMPT, num_generations=rows, max_new_tokens=new_tokens, temperature=1.0,
                 stop_ids=[], lora_autocast=lora_autocast)
    with adapter_merged(policy) if merged else contextlib.nullcontext():
        run()
        return profiled(run)["aten_calls"]


def per_step(policy, tokenizer, rows: int, mode: dict) -> float:
    """Ops of one decode step: the difference between 6 and 2 new tokens, over the 4 steps between."""
    return (dispatches(policy, tokenizer, 6, rows, **mode) - dispatches(policy, tokenizer, 2, rows, **mode)) / 4


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: the tiny FRE one)")
    parser.add_argument("--model", default=None, help="architecture directory (random weights, cut to 1 and 2 layers)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer files, for an architecture directory without them")
    parser.add_argument("--rows", type=int, default=8, help="completions generated together")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "decode_dispatches.json"))
    args = parser.parse_args(argv)
    if args.rows < 1:
        parser.error("--rows must be at least 1")
    if args.model and not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: not an architecture directory (no config.json)")
    from transformers import AutoConfig

    from lmmr1_lite import models
    from lmmr1_lite.config import resolve_config

    overrides = {"random_init": "true", "dtype": "bfloat16", **({"tokenizer": args.tokenizer} if args.tokenizer else {})}
    cfg = resolve_config(None, args.config, overrides)
    source = args.model or cfg.model
    full_layers = AutoConfig.from_pretrained(source).get_text_config().num_hidden_layers
    device = models.pick_device()
    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code, cfg.tokenizer)
    counts = {}  # layers -> mode -> ops per decode step
    for layers in (1, 2):
        with tempfile.TemporaryDirectory() as directory:
            torch.manual_seed(cfg.seed)
            cut = resolve_config(None, args.config, {**overrides, "model": first_layers_of(source, layers, directory)})
            policy = models.add_lora(models.load_base_model(cut, device), cut)
            counts[layers] = {label: per_step(policy, tokenizer, args.rows, mode) for label, mode in MODES.items()}
            del policy
    modes = {}
    for label in MODES:
        layer = counts[2][label] - counts[1][label]
        other = counts[1][label] - layer
        modes[label] = {"per_layer": layer, "other": other, "whole_model": full_layers * layer + other}
    first = modes[next(iter(MODES))]["whole_model"]
    for row in modes.values():
        row["vs_peft_fp32_casts"] = row["whole_model"] / first
    report = {"benchmark": "decode_dispatches", "date": str(date.today()), "device": str(device),
              "model": source, "quantization": cfg.quantization, "layers": full_layers, "rows": args.rows,
              "counted": "aten:: ops per decode step (torch.profiler), views included",
              "modes": modes}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_report(args.out, report)
    print(json.dumps(report, indent=2))
    print("\n| rollouts' LoRA | ops per layer | other ops | whole model | vs peft's casts |\n|---|---:|---:|---:|---:|")
    for label, row in modes.items():
        print(f"| {label} | {row['per_layer']:.0f} | {row['other']:.0f} | {row['whole_model']:.0f} | "
              f"{row['vs_peft_fp32_casts']:.2f} |")
    return report


if __name__ == "__main__":
    main()

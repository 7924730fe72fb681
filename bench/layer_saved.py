"""What one decoder layer keeps for its backward, per token, beside the planner's "one layer recomputed" figure.

With gradient checkpointing the backward rebuilds one layer at a time, and what that layer saves for its own
backward is the largest per-token part of the training working set. This counts it exactly (each saved
storage once, through `torch.autograd.graph.saved_tensors_hooks`) for the LoRA side path in bf16
(`lora_autocast`) and through peft's fp32 casts, at two lengths whose difference leaves out what does not grow
with the tokens (autocast's bf16 copies of the LoRA weights). Random weights, bf16; any device.

    python bench/layer_saved.py --model configs/models/qwen2_5_vl_3b --quantization nf4    # the 3B's layer
Writes bench/out/layer_saved.json (or --out) and prints it.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_step import first_layers_of, write_report  # noqa: E402


def saved_bytes_of_one_layer(policy, tokens: int, autocast: bool) -> dict:
    """Bytes the first decoder layer of `policy` keeps for its backward over `tokens` random bf16 tokens
    (train mode, LoRA side path in bf16 when `autocast`), in all and by (shape, dtype) of the saved storage."""
    from lmmr1_lite import models

    body = models.backbone(policy).language_model
    x = torch.randn(1, tokens, body.config.hidden_size, dtype=torch.bfloat16, requires_grad=True,
                    device=body.embed_tokens.weight.device)
    positions = torch.arange(tokens, device=x.device)[None, None, :].expand(3, 1, tokens)
    storages, shapes = {}, {}

    def keep(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in storages:
            storages[pointer] = tensor.untyped_storage().nbytes()
            shape = f"{list(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"
            shapes[shape] = shapes.get(shape, 0) + storages[pointer]
        return tensor
    policy.train()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), models.lora_autocast(policy, autocast):
        body.layers[0](x, position_embeddings=body.rotary_emb(x, positions), attention_mask=None,
                       position_ids=positions)
    return {"bytes": sum(storages.values()), "by_shape": dict(sorted(shapes.items(), key=lambda kv: -kv[1]))}


def per_token(policy, tokens: int, autocast: bool) -> float:
    """Saved bytes per token of one layer: the difference between `tokens` and a third of them."""
    short = max(1, tokens // 3)
    return ((saved_bytes_of_one_layer(policy, tokens, autocast)["bytes"]
             - saved_bytes_of_one_layer(policy, short, autocast)["bytes"]) / (tokens - short))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: the tiny FRE one)")
    parser.add_argument("--model", default=None, help="architecture directory (random weights; one layer is built)")
    parser.add_argument("--quantization", default="nf4", choices=("none", "nf4", "int8"))
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "layer_saved.json"))
    args = parser.parse_args(argv)
    if args.tokens < 3:
        parser.error("--tokens must be at least 3")
    if args.model and not (Path(args.model) / "config.json").is_file():
        parser.error(f"--model {args.model}: not an architecture directory (no config.json)")
    from lmmr1_lite import models
    from lmmr1_lite.config import resolve_config
    from lmmr1_lite.plan import estimate

    overrides = {"random_init": "true", "dtype": "bfloat16", "quantization": args.quantization,
                 "gradient_checkpointing": "false"}  # the layer's own saves, not a checkpoint's
    layer_dir = tempfile.TemporaryDirectory()
    if args.model:
        overrides["model"] = first_layers_of(args.model, 1, layer_dir.name)
    cfg = resolve_config(None, args.config, overrides)
    device = models.pick_device()
    policy = models.add_lora(models.load_base_model(cfg, device), cfg)
    config = policy.get_base_model().config
    plan = estimate(replace(cfg, gradient_checkpointing=True), config, has_images=False)
    planned = plan["parts"]["one layer recomputed in backward"] / plan["micro_batch_tokens"]
    hidden_vector = 2 * config.text_config.hidden_size  # bytes of one bf16 hidden state
    measured = {autocast: per_token(policy, args.tokens, autocast) for autocast in (True, False)}
    report = {"benchmark": "layer_saved", "date": str(date.today()), "device": str(device),
              "model": args.model or cfg.model, "quantization": args.quantization, "tokens": args.tokens,
              "planner_bytes_per_token": planned,
              "bf16_side_path_bytes_per_token": measured[True], "peft_fp32_casts_bytes_per_token": measured[False],
              "in_hidden_vectors": {"planner": planned / hidden_vector, "bf16_side_path": measured[True] / hidden_vector,
                                    "peft_fp32_casts": measured[False] / hidden_vector},
              "by_shape": {label: saved_bytes_of_one_layer(policy, args.tokens, autocast)["by_shape"]
                           for label, autocast in (("bf16_side_path", True), ("peft_fp32_casts", False))}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_report(args.out, report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

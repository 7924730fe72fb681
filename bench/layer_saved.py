"""What one decoder layer keeps for its backward, and its forward + backward's peak, per token, beside the
planner's "one layer recomputed" figure.

With gradient checkpointing the backward rebuilds one layer at a time, and what that layer holds while it is
rebuilt and run backward is the largest per-token part of the training working set. This counts what it saves
exactly (each saved storage once, through `torch.autograd.graph.saved_tensors_hooks`) for the LoRA side path in
bf16 (`lora_autocast`) and through peft's fp32 casts, and the peak of its forward and backward (the saved tensors
and the backward's transients; torch's allocations and frees from the profiler), at two lengths whose difference
leaves out what does not grow with the tokens (autocast's bf16 copies of the LoRA weights). Random weights, bf16;
any device.

    python bench/layer_saved.py --model configs/models/qwen2_5_vl_3b --quantization nf4    # the 3B's layer
Writes bench/out/layer_saved.json (or --out) and prints it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_step import first_layers_of, write_report  # noqa: E402


def layer_inputs(policy, tokens: int) -> tuple:
    """Random bf16 hidden states of `tokens` tokens for `policy`'s first decoder layer, their positions and rotary
    embedding, and a random gradient for its output: made before the layer runs, outside what is counted."""
    from lmmr1_lite import models

    body = models.backbone(policy).language_model
    x = torch.randn(1, tokens, body.config.hidden_size, dtype=torch.bfloat16, requires_grad=True,
                    device=body.embed_tokens.weight.device)
    positions = torch.arange(tokens, device=x.device)[None, None, :].expand(3, 1, tokens)
    return x, positions, body.rotary_emb(x, positions), torch.randn_like(x)


def run_one_layer(policy, inputs: tuple, autocast: bool, saved_hook=None, backward: bool = False) -> None:
    """The first decoder layer of `policy` on `layer_inputs` (train mode, LoRA side path in bf16 when `autocast`),
    its saved tensors passed through `saved_hook`, then its backward from the inputs' gradient when `backward`."""
    from lmmr1_lite import models

    x, positions, embedding, grad = inputs
    policy.train()
    hooks = torch.autograd.graph.saved_tensors_hooks(saved_hook, lambda t: t) if saved_hook else contextlib.nullcontext()
    with hooks, models.lora_autocast(policy, autocast):
        out = models.backbone(policy).language_model.layers[0](
            x, position_embeddings=embedding, attention_mask=None, position_ids=positions)
    out = out[0] if isinstance(out, tuple) else out
    if backward:
        out.backward(grad)


def saved_bytes_of_one_layer(policy, tokens: int, autocast: bool) -> dict:
    """Bytes the first decoder layer of `policy` keeps for its backward over `tokens` tokens (`run_one_layer`), in
    all and by (shape, dtype) of the saved storage."""
    storages, shapes = {}, {}

    def keep(tensor):
        pointer = tensor.untyped_storage().data_ptr()
        if pointer not in storages:
            storages[pointer] = tensor.untyped_storage().nbytes()
            shape = f"{list(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"
            shapes[shape] = shapes.get(shape, 0) + storages[pointer]
        return tensor
    run_one_layer(policy, layer_inputs(policy, tokens), autocast, saved_hook=keep)
    return {"bytes": sum(storages.values()), "by_shape": dict(sorted(shapes.items(), key=lambda kv: -kv[1]))}


def peak_bytes_of_one_layer(policy, tokens: int, autocast: bool) -> int:
    """The most bytes torch's allocator held at once, above what it held before, over the first decoder layer's
    forward and backward (`run_one_layer`): what the layer saves plus its backward's transients at their peak,
    which is what a checkpointed layer adds to the training pass while it is rebuilt. Counted exactly from the
    profiler's allocation and free events (any device's allocator; on a CPU the resident set would miss the
    blocks glibc's heap reuses)."""
    from torch.profiler import ProfilerActivity, profile

    run_one_layer(policy, layer_inputs(policy, tokens), autocast, backward=True)  # one-time work outside the window
    inputs = layer_inputs(policy, tokens)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, profile_memory=True) as prof:
        run_one_layer(policy, inputs, autocast, backward=True)
    held = peak = 0
    for _, change in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        held += change
        peak = max(peak, held)
    return peak


def per_token(policy, tokens: int, autocast: bool, measure=None) -> float:
    """Bytes per token of one layer (`measure`: saved bytes by default, or `peak_bytes_of_one_layer`): the
    difference between `tokens` and a third of them, which leaves out what does not grow with the tokens."""
    measure = measure or (lambda *args: saved_bytes_of_one_layer(*args)["bytes"])
    short = max(1, tokens // 3)
    return (measure(policy, tokens, autocast) - measure(policy, short, autocast)) / (tokens - short)


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
    peak = per_token(policy, args.tokens, True, peak_bytes_of_one_layer)  # saved + the backward's transients
    report = {"benchmark": "layer_saved", "date": str(date.today()), "device": str(device),
              "model": args.model or cfg.model, "quantization": args.quantization, "tokens": args.tokens,
              "planner_bytes_per_token": planned,
              "bf16_side_path_bytes_per_token": measured[True], "peft_fp32_casts_bytes_per_token": measured[False],
              "forward_backward_peak_bytes_per_token": peak,
              "in_hidden_vectors": {"planner": planned / hidden_vector, "bf16_side_path": measured[True] / hidden_vector,
                                    "peft_fp32_casts": measured[False] / hidden_vector,
                                    "forward_backward_peak": peak / hidden_vector},
              "by_shape": {label: saved_bytes_of_one_layer(policy, args.tokens, autocast)["by_shape"]
                           for label, autocast in (("bf16_side_path", True), ("peft_fp32_casts", False))}}
    write_report(args.out, report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

"""The real 0.5B model's GRPO step against this machine's floors, per phase and per dtype, as JSON.

Floors are measured here first, in the same process (torch, all threads): the memory read rate (a sum over
a 1 GiB tensor) and the matmul rate at each dtype (a [2048, 896] x [896, 4864] GEMM, the model's MLP shape).
Then, per dtype, one GRPO step of `configs/real_0_5b/fre.yaml` at a smaller batch (after a warm-up step):
- generate: every decode step reads the language model's matmul weights (and the LM head) once and multiplies
  them by its live rows, so its floor is the larger of decode steps x weight bytes / read rate and
  2 x matmul parameters x row-steps / matmul rate, plus the prefill's FLOPs / matmul rate; the decode loop's own
  share is measured by replaying one decode step's GEMMs at the batch's row count (`matmul_share`);
- update (forward + backward of the training pass; LoRA: the frozen weights need only d(input)): about
  2 x 2 x matmul parameters x tokens FLOPs / matmul rate;
- score (rewards; a reference pass only when beta > 0: 2 x parameters x tokens).

    python bench/real_step.py                      # fp32 and bf16, 2 prompts x 4 completions x 128 tokens
Writes bench/out/real_step.json (or --out) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def read_rate() -> float:
    """Bytes per second of one pass summing a 1 GiB fp32 tensor (best of 5)."""
    x = torch.ones(2**28)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - start)
    return x.numel() * 4 / best


def matmul_rate(dtype: torch.dtype, rows: int = 2048) -> float:
    """FLOP/s of a [rows, 896] x [896, 4864] GEMM at `dtype` (best of 5)."""
    x, w = torch.randn(rows, 896, dtype=dtype), torch.randn(4864, 896, dtype=dtype)
    torch.nn.functional.linear(x, w)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        torch.nn.functional.linear(x, w)
        best = min(best, time.perf_counter() - start)
    return 2 * rows * 896 * 4864 / best


def matmul_weights(policy) -> list[torch.Tensor]:
    """The language model's linear weights and the LM head: what one decode step reads."""
    from lmmr1_lite import models

    body = models.backbone(policy).language_model
    weights = [m.weight for name, m in body.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in name]
    return weights + [models.lm_head_weight(policy)]


def decode_gemm_seconds(weights: list[torch.Tensor], rows: int) -> float:
    """Seconds of one decode step's GEMMs alone at `rows` rows (best of 3)."""
    xs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights}
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for w in weights:
            torch.nn.functional.linear(xs[w.shape[1]], w)
        best = min(best, time.perf_counter() - start)
    return best


def one_dtype(model: str, dtype: str, args, rates: dict) -> dict:
    from lmmr1_lite import models, tasks
    from lmmr1_lite.config import parse_sets, resolve_config
    from lmmr1_lite.step import StepContext, compute_gradients, grpo_step, rows_with_loss

    def configured(sets: list[str]):
        cfg = resolve_config("fre", str(REPO / "configs" / "real_0_5b" / "fre.yaml"), {"model": model, **parse_sets(sets)})
        return replace(cfg, dtype=dtype, prompts_per_step=args.prompts, num_generations=args.generations,
                       max_new_tokens=args.max_new_tokens)
    cfg = configured(args.sets)
    torch.manual_seed(0)
    tokenizer = models.load_tokenizer(cfg.model)
    policy = models.add_lora(models.load_base_model(cfg, torch.device("cpu")), cfg)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    ctx = StepContext(policy, tokenizer, cfg, optimizer, scheduler)
    train, _ = tasks.generate(cfg.data, 64, 0, seed=0, level=cfg.task_level)
    grpo_step(ctx, train[:cfg.prompts_per_step])  # warm-up: first-call allocations and one-time setup
    measured = train[cfg.prompts_per_step: 2 * cfg.prompts_per_step]
    if args.profile:  # where the step's time goes, by op (self time), beside the phase totals
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            metrics, scored = grpo_step(ctx, measured)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        args.out.with_name(f"{args.out.stem}-profile-{dtype}.txt").write_text(table + "\n")
    else:
        metrics, scored = grpo_step(ctx, measured)
    update_ab = {}
    if args.update_ab:  # the training pass again on these very rollouts, as configured and with the change
        for label, variant in (("as configured", cfg), (args.update_ab, configured(args.sets + [args.update_ab]))):
            ctx.cfg = variant
            start = time.perf_counter()
            compute_gradients(ctx, scored)
            update_ab[label] = time.perf_counter() - start
        ctx.cfg = cfg
        for p in params:
            p.grad = None
    weights = matmul_weights(policy)
    weight_bytes = sum(w.numel() * w.element_size() for w in weights)
    matmul_params = sum(w.numel() for w in weights)
    batch = scored.batch
    lengths = batch.completion_mask.sum(1)
    decode_steps = int(lengths.max())
    row_steps = int(lengths.sum())
    prompt_tokens = int(batch.prompt_mask[::cfg.num_generations].sum())  # each prompt once (shared)
    trained = rows_with_loss(cfg, scored.advantages)  # rows of tied groups carry no loss and skip the update
    first_rows = sorted({row // cfg.num_generations * cfg.num_generations for row in trained.tolist()})
    train_tokens = int(batch.prompt_mask[first_rows].sum()) + int(lengths[trained].sum())
    flops = rates[dtype]
    rows = batch.completion_ids.shape[0]
    gemm = decode_gemm_seconds(weights, rows)
    # A decode step reads every weight once (read-bound at few rows) and multiplies it by its live rows
    # (compute-bound at many): the larger of the two sums is a floor, and the prefill's GEMMs come on top.
    decode_floor = max(decode_steps * weight_bytes / rates["read"], 2 * matmul_params * row_steps / flops)
    floors = {"generate_seconds": decode_floor + 2 * matmul_params * prompt_tokens / flops,
              "update_seconds": 4 * matmul_params * train_tokens / flops,
              "score_seconds": (2 * matmul_params * train_tokens / flops) if cfg.beta > 0 else 0.0}
    phases = {k: metrics[k] for k in ("generate_seconds", "score_seconds", "update_seconds", "step_seconds")}
    return {"dtype": dtype, "rows": rows, "decode_steps": decode_steps, "row_steps": row_steps,
            "prompt_tokens": prompt_tokens, "train_tokens": train_tokens, "weight_bytes": weight_bytes,
            "matmul_params": matmul_params, "rows_trained": len(trained), "phases": phases, "floors": floors,
            "over_floor": {k: phases[k] / floors[k] for k in floors if floors[k] > 0},
            "decode_step_seconds": metrics["generate_seconds"] / max(decode_steps, 1),
            "decode_step_gemm_seconds_at_full_batch": gemm,
            "mean_length": metrics["completions/mean_length"],
            "update_ab_seconds": update_ab}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "real_step.json")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a config field over configs/real_0_5b/fre.yaml (e.g. merge_for_rollouts=true)")
    parser.add_argument("--update-ab", default=None, metavar="KEY=VALUE", help="after the measured step, time the "
                        "training pass (forward + backward, no optimizer step) again on the same rollouts, as configured "
                        "and with this field changed (e.g. lora_autocast=false): a like-for-like comparison")
    parser.add_argument("--profile", action="store_true", help="also write the measured step's top ops by self "
                        "time (torch.profiler) beside --out; the profiler's overhead inflates the phase times")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from lmmr1_lite import real_model

    model = str(real_model.build(log=lambda line: print(line, file=sys.stderr)))
    rates = {"read": read_rate(), "float32": matmul_rate(torch.float32), "bfloat16": matmul_rate(torch.bfloat16)}
    runs = [one_dtype(model, dtype, args, rates) for dtype in args.dtypes.split(",")]
    result = {"date": str(date.today()), "threads": torch.get_num_threads(), "model": model,
              "shape": f"{args.prompts} prompts x {args.generations} completions x <= {args.max_new_tokens} tokens",
              "sets": args.sets,
              "floors_measured": {"read_GB_per_s": rates["read"] / 1e9, "float32_GFLOP_per_s": rates["float32"] / 1e9,
                                  "bfloat16_GFLOP_per_s": rates["bfloat16"] / 1e9}, "runs": runs}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"read {rates['read'] / 1e9:.1f} GB/s, fp32 {rates['float32'] / 1e9:.0f} GFLOP/s, "
          f"bf16 {rates['bfloat16'] / 1e9:.0f} GFLOP/s; {result['shape']}")
    print("| dtype | phase | measured s | floor s | x floor |\n|---|---|---:|---:|---:|")
    for run in runs:
        for phase in ("generate_seconds", "update_seconds", "score_seconds"):
            floor = run["floors"][phase]
            ratio = f"{run['phases'][phase] / floor:.1f}" if floor else ""
            print(f"| {run['dtype']} | {phase[:-8]} | {run['phases'][phase]:.1f} | {floor:.1f} | {ratio} |")
        print(f"| {run['dtype']} | decode step | {run['decode_step_seconds'] * 1e3:.0f} ms | GEMMs alone at "
              f"{run['rows']} rows: {run['decode_step_gemm_seconds_at_full_batch'] * 1e3:.0f} ms | |")
        for label, seconds in run["update_ab_seconds"].items():
            print(f"| {run['dtype']} | update again, {label} | {seconds:.1f} | {run['floors']['update_seconds']:.1f} | "
                  f"{seconds / run['floors']['update_seconds']:.1f} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

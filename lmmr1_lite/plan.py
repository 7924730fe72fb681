"""`lmmr1-lite plan`: estimated peak GPU memory of a config, by component, from the architecture alone.

Parameter counts are computed from the model's `config.json` (no weights are loaded). The step's two
peaks are the generation phase (weights + LoRA state + KV cache) and the training phase (weights +
LoRA state + checkpointed activations + one layer recomputed + the log-prob chunk, and the KV cache when
the static or compiled decode cache keeps it for the next step); the larger wins.
These are estimates; `bench/e2e_step.py` measures.

`--gpus N` (data parallelism under torchrun) plans one GPU of N: each holds the whole model, adapter and
optimizer, and prompts_per_step / N prompts with their G completions; so N GPUs shrink the KV cache and
the vision working set per card, never the weights.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from .config import TrainConfig

GIB = 2**30
NF4_BITS = 4 + 8 / 64 + 32 / (64 * 256)  # 4-bit codes + an 8-bit absmax per 64 weights + an fp32 scale per 256 blocks
# CUDA context + cuBLAS/cuDNN/Triton workspaces: the device memory in use beyond the allocator's reservation, measured
# during a 3B FRE step on one H200 (torch 2.11, CUDA 13, 2026-12-04: 0.823 GiB; bench/RESULTS.md); was a 0.6 guess.
# Other cards and drivers differ by some hundreds of MiB.
CUDA_CONTEXT = 0.82 * GIB
FRAGMENTATION = 1.10      # allocator slack on top of live tensors


@dataclass
class ParameterCounts:
    language_linear: int   # q, k, v, o, gate, up, down of every layer (weights + biases)
    language_other: int    # norms
    embeddings: int        # input embeddings
    lm_head: int           # 0 when tied to the embeddings
    vision: int            # the whole vision tower, merger included
    lora: int              # LoRA A and B matrices on the targeted language-model linears
    lora_targeted: int = 0  # weights (no biases) of the linears LoRA targets: what merge_for_rollouts copies

    @property
    def total(self) -> int:
        return self.language_linear + self.language_other + self.embeddings + self.lm_head + self.vision


def count_parameters(config, lora_r: int = 0, lora_targets: tuple = ()) -> ParameterCounts:
    """Exact parameter counts of a Qwen2.5-VL config (checked against built models in the tests)."""
    text, vision = config.text_config, config.vision_config
    h, inter, layers = text.hidden_size, text.intermediate_size, text.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
    q_out, kv_out = text.num_attention_heads * head_dim, text.num_key_value_heads * head_dim
    shapes = {"q_proj": (h, q_out, True), "k_proj": (h, kv_out, True), "v_proj": (h, kv_out, True),
              "o_proj": (q_out, h, False), "gate_proj": (h, inter, False), "up_proj": (h, inter, False),
              "down_proj": (inter, h, False)}
    linear = layers * sum(i * o + (o if bias else 0) for i, o, bias in shapes.values())
    lora = layers * sum(lora_r * (i + o) for name, (i, o, _) in shapes.items() if name in lora_targets)
    targeted = layers * sum(i * o for name, (i, o, _) in shapes.items() if name in lora_targets) if lora_r else 0
    tied = getattr(config, "tie_word_embeddings", False) or getattr(text, "tie_word_embeddings", False)
    vh, vi, patch = vision.hidden_size, vision.intermediate_size, vision.patch_size
    merged = vh * vision.spatial_merge_size ** 2
    vision_params = (vision.in_channels * vision.temporal_patch_size * patch * patch * vh  # patch embedding
                     + vision.depth * (2 * vh + vh * 3 * vh + 3 * vh + vh * vh + vh + 3 * vh * vi + 2 * vi + vh)
                     + vh + merged * merged + merged + merged * vision.out_hidden_size + vision.out_hidden_size)
    return ParameterCounts(language_linear=linear, language_other=layers * 2 * h + h,
                           embeddings=text.vocab_size * h, lm_head=0 if tied else text.vocab_size * h,
                           vision=vision_params, lora=lora, lora_targeted=targeted)


def image_tokens(max_pixels: int) -> int:
    """LLM tokens of one image at max_pixels (one per 28x28 patch group)."""
    return max_pixels // (28 * 28)


def estimate(cfg: TrainConfig, config, has_images: bool, prompt_tokens: int | None = None) -> dict:
    """Bytes per component and the two phase peaks, for prompts of `prompt_tokens` (default: 256 text
    tokens plus one image at max_pixels for stage mgt) and completions of max_new_tokens."""
    from lmmr1_kernels.logprobs import chunk_rows_for_bytes

    from .decoding import StaticDecodeStep
    from .sampling import sample_chunk_rows, scratch_bytes_per_logit

    counts = count_parameters(config, cfg.lora_r, tuple(cfg.lora_target_modules))
    text = config.text_config
    h, layers, vocab = text.hidden_size, text.num_hidden_layers, text.vocab_size
    head_dim = getattr(text, "head_dim", None) or h // text.num_attention_heads
    elt = 4 if cfg.dtype == "float32" else 2  # bytes per value in `dtype` ('auto' is bf16 on a GPU)
    weight_bits = {"nf4": NF4_BITS, "int8": 8, "none": 8 * elt}[cfg.quantization]
    prompt = prompt_tokens or min(cfg.max_prompt_tokens, 256 + (image_tokens(cfg.max_pixels) if has_images else 0))
    seq = prompt + cfg.max_new_tokens
    sequences = cfg.prompts_per_step * cfg.num_generations
    # a generate call takes generation_batch_size prompts (0: all of them) with their G completions
    generating_prompts = min(cfg.prompts_per_step, cfg.generation_batch_size or cfg.prompts_per_step)
    generating_rows = generating_prompts * cfg.num_generations
    # the static and compiled caches are preallocated at a multiple of LENGTH_QUANTUM and kept for the next
    # step's rollouts (decoding.StaticDecodeStep), so they hold their memory through the training phase too
    kept_cache = cfg.decode_cache != "dynamic"
    quantum = StaticDecodeStep.LENGTH_QUANTUM
    cache_len = -(-seq // quantum) * quantum if kept_cache else seq
    micro = cfg.micro_batch_size
    if cfg.max_tokens_per_micro_batch:  # as micro_batching.micro_rows caps it
        micro = min(micro, max(1, cfg.max_tokens_per_micro_batch // seq))
    micro = min(micro, sequences)
    # tokens one training micro-batch runs through the model: with share_prompt each of its prompts once
    # (`micro` rows that are not whole groups can straddle one group more), else every row's own copy
    whole, spill = divmod(micro, cfg.num_generations)
    groups = min(cfg.prompts_per_step, whole + (2 if spill else 0))
    micro_tokens = groups * prompt + micro * cfg.max_new_tokens if cfg.share_prompt else micro * seq
    scored = micro * cfg.max_new_tokens  # completion positions the log-prob kernels score
    # on CUDA the logits block is the GEMM's own output in `dtype` (Triton, a frozen head: `logits_block_dtype`)
    chunk_rows = chunk_rows_for_bytes(scored, vocab, cfg.logprob_chunk_bytes or None, "cuda", elt)
    optimizer_bytes = 2 if cfg.optim == "paged_adamw_8bit" else 8
    # elements of the largest language-model linear (the MLP's, or q_proj's if wider)
    largest_linear = max(h * text.num_attention_heads * head_dim, h * text.intermediate_size)
    vision_act = 0
    if has_images:  # one image per prompt through the vision tower, no grad (frozen), its blocks' working set
        patches = cfg.max_pixels // (14 * 14)
        vision_act = generating_prompts * patches * config.vision_config.hidden_size * elt * 6
    parts = {
        "quantised language-model linears": counts.language_linear * weight_bits / 8,
        "unquantised parts (embeddings, LM head, norms, vision)":
            elt * (counts.embeddings + counts.lm_head + counts.language_other + counts.vision),
        "LoRA parameters + gradients + optimizer states (fp32)": counts.lora * (4 + 4 + optimizer_bytes),
        # rollout.adapter_merged: each targeted weight gets a merged copy in `dtype` while generating (the
        # originals, full-precision or 4/8-bit, are kept to come back untouched)
        "merged copy of the adapted linears (merge_for_rollouts)":
            counts.lora_targeted * elt if cfg.merge_for_rollouts else 0,
        # decoding.decode under lora_autocast: autocast's cast cache holds a bf16 copy of every LoRA weight for
        # the whole generation (no LoRA side path runs when the adapter is merged)
        "bf16 LoRA weights while generating (lora_autocast)":
            2 * counts.lora if cfg.lora_autocast and cfg.dtype in ("auto", "bfloat16") and not cfg.merge_for_rollouts
            else 0,
        "KV cache during generation": 2 * layers * text.num_key_value_heads * head_dim * elt * generating_rows
                                      * cache_len,
        # with checkpointing one hidden state per layer is kept and one layer's working set is rebuilt in
        # backward; without it every layer keeps its whole working set
        # the prefill runs each prompt once (no grad): one layer's transients at a time over all prompt tokens
        "prefill working set (one layer, no grad)":
            generating_prompts * prompt * elt * (3 * text.intermediate_size + 4 * h),
        # each decode step's logits in `dtype` for every row of the call, and the sampler's fp32 scratch
        # over one chunk of rows (sampling.next_tokens' chunks on CUDA)
        "decode step's logits and sampling scratch": generating_rows * vocab * elt
            + sample_chunk_rows(generating_rows, vocab, "cuda") * vocab
            * scratch_bytes_per_logit(cfg.temperature, cfg.top_k, cfg.top_p),
        "activations kept for backward": micro_tokens * elt * layers * (
            h if cfg.gradient_checkpointing else 12 * h + 4 * text.intermediate_size),
        # what the rebuilt layer saves (12 h + 4 I elements per token), its backward's transients at their peak
        # (5 h), and the gradient arriving from the layer above (h). The peak of torch's allocations over one
        # layer's forward + backward, that gradient made before, in hidden vectors per token (bench/layer_saved.py,
        # 2026-12-05; bench/RESULTS.md): the 3B's layer 38.8 against 17 h + 4 I = 38.5, the 7B's 35.8 against
        # 38.1, the tiny model's 29.7 against 29.0; 12 h + 4 I alone (33.5) fell 14 % short at the 3B's
        "one layer recomputed in backward":
            micro_tokens * elt * (18 * h + 4 * text.intermediate_size) if cfg.gradient_checkpointing else 0,
        # one [rows, vocab] logits block, the GEMM's own output on CUDA (its gradient written in place and
        # taken by the grad-hidden GEMM as it is), and the gradient of the scored hidden states, in their dtype
        "log-prob chunk (logits block + gradient of hidden)": chunk_rows * vocab * elt + scored * h * elt,
        "vision encoder working set": vision_act,
        # a 4/8-bit linear is dequantised to `dtype` for its matmul, forward and backward, one at a time
        "dequantised weight of the largest linear": 0 if cfg.quantization == "none" else largest_linear * elt,
        # torch's AdamW on CUDA tensors takes its foreach path, whose step builds one fp32 temporary the size
        # of the parameters (the square root of the second moments); it runs after the activations are freed
        "optimizer step scratch": 4 * counts.lora if cfg.optim == "adamw_torch" else 0,
        "CUDA context and workspaces": CUDA_CONTEXT,
    }
    static = sum(parts[k] for k in (
        "quantised language-model linears", "unquantised parts (embeddings, LM head, norms, vision)",
        "LoRA parameters + gradients + optimizer states (fp32)", "CUDA context and workspaces"))
    dequantised = parts["dequantised weight of the largest linear"]
    kv_cache = parts["KV cache during generation"]
    generating = dequantised + kv_cache + sum(parts[k] for k in (
        "prefill working set (one layer, no grad)", "decode step's logits and sampling scratch",
        "vision encoder working set", "merged copy of the adapted linears (merge_for_rollouts)",
        "bf16 LoRA weights while generating (lora_autocast)"))
    # the logits block is freed before the backward reaches the layers, so it and the recomputed layer are
    # never alive together
    backward = dequantised + parts["activations kept for backward"] + max(
        parts["log-prob chunk (logits block + gradient of hidden)"], parts["one layer recomputed in backward"])
    generation = static + generating
    # with decode_cache 'compiled' the merged copies (merge_for_rollouts) are kept between steps too
    # (rollout.adapter_merged's `keep`: the CUDA graphs need their addresses fixed)
    kept = (kv_cache if kept_cache else 0) + (parts["merged copy of the adapted linears (merge_for_rollouts)"]
                                              if cfg.decode_cache == "compiled" else 0)
    training = static + max(backward, parts["optimizer step scratch"]) + kept
    return {"parts": parts, "generation_working_set": generating, "training_working_set": backward,
            "generation_peak": generation * FRAGMENTATION, "training_peak": training * FRAGMENTATION,
            "peak": max(generation, training) * FRAGMENTATION, "counts": counts, "sequence_tokens": seq,
            "prompt_tokens": prompt, "kv_cache_kept": kept_cache, "micro_batch": micro,
            "micro_batch_tokens": micro_tokens, "sequences": sequences}


def advice(cfg: TrainConfig, result: dict) -> str:
    """The setting to change first when the plan does not fit."""
    parts = result["parts"]
    if result["generation_peak"] >= result["training_peak"]:
        return (f"generation holds {parts['KV cache during generation'] / GIB:.1f} GiB of KV cache: lower "
                "generation_batch_size (prompts per generate call), num_generations or max_new_tokens")
    if not cfg.gradient_checkpointing:
        return "turn gradient_checkpointing on"
    if cfg.quantization == "none":
        return "set quantization: nf4"
    return "lower max_tokens_per_micro_batch (or micro_batch_size)"


def render(cfg: TrainConfig, model_name: str, result: dict, gpu_gb: float, gpus: int = 1) -> str:
    counts = result["counts"]
    lines = [f"{gpus} GPUs, data parallel: each holds the whole model; {cfg.prompts_per_step} prompts x "
             f"{cfg.num_generations} completions per GPU per step ({cfg.prompts_per_step * gpus} prompts in all); "
             "the plan below is per GPU"] if gpus > 1 else []
    lines += [f"memory plan for {model_name}: {counts.total / 1e9:.2f} B parameters "
             f"({counts.lora / 1e6:.1f} M LoRA), {result['sequences']} sequences of up to "
             f"{result['sequence_tokens']} tokens, micro-batch {result['micro_batch']}, quantization {cfg.quantization}",
             f"{'component':<58}{'GiB':>8}"]
    lines += [f"{name:<58}{value / GIB:>8.2f}" for name, value in result["parts"].items()]
    lines.append(f"{'peak while generating (x' + str(FRAGMENTATION) + ' allocator slack)':<58}"
                 f"{result['generation_peak'] / GIB:>8.2f}")
    if result["kv_cache_kept"]:
        kept = "the KV cache" + (" and the merged copy are" if cfg.merge_for_rollouts and cfg.decode_cache == "compiled"
                                 else " is")
        lines.append(f"(decode_cache {cfg.decode_cache}: {kept} kept for the next step, through training)")
    lines.append(f"{'peak while training (x' + str(FRAGMENTATION) + ' allocator slack)':<58}"
                 f"{result['training_peak'] / GIB:>8.2f}")
    fits = result["peak"] <= gpu_gb * GIB
    lines.append(f"estimated peak {result['peak'] / GIB:.1f} GiB: {'fits' if fits else 'does NOT fit'} "
                 f"{'each' if gpus > 1 else 'a'} {gpu_gb:g} GB card"
                 + ("" if fits else f"; change first: {advice(cfg, result)}"))
    return "\n".join(lines)


def plan(cfg: TrainConfig, gpu_gb: float, gpus: int = 1) -> str:
    from transformers import AutoConfig

    from .config import REPO_ROOT, ConfigError

    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    if cfg.prompts_per_step % gpus:
        raise ConfigError(f"prompts_per_step={cfg.prompts_per_step} is not divisible by --gpus {gpus}: each GPU takes "
                          "the same number of prompts (their completions stay on it)")
    if gpus > 1:  # one GPU's share of a step
        cfg = replace(cfg, prompts_per_step=cfg.prompts_per_step // gpus)

    from . import hub

    shipped = {"Qwen/Qwen2.5-VL-3B-Instruct": "qwen2_5_vl_3b", "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2_5_vl_7b"}
    if cfg.model in shipped and not Path(cfg.model).exists():  # the shipped copy of its architecture: no network
        config = AutoConfig.from_pretrained(REPO_ROOT / "configs" / "models" / shipped[cfg.model])
    else:
        hub.check_model_source(cfg.model)  # offline with a Hub id: one line now, not retries
        try:
            config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError) as err:
            raise ConfigError(f"model {cfg.model!r}: cannot read its config ({str(err).splitlines()[0]})") from None
    has_images = cfg.stage == "mgt"
    return render(cfg, cfg.model, estimate(cfg, config, has_images), gpu_gb, gpus)

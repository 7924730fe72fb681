"""Loading the policy: a Qwen2.5-VL-class model with LoRA on its language model.

The reference policy is the same module with the adapter disabled (`policy.disable_adapter()`),
so there is one copy of the weights. Log-probs never go through the model's `lm_head` call:
`hidden_states` returns the backbone's last hidden states and the kernels take the LM head's
weight directly, so the `[tokens, vocab]` logits are never materialised.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import warnings
from pathlib import Path

import torch

from .config import ConfigError, TrainConfig

_warned: set[str] = set()
# bitsandbytes' CPU backend, imported by peft, looks for the optional Hugging Face `kernels` package and
# logs "pip install kernels" when it is missing; the packed CPU path it wants is the one
# load_base_model switches off (it cannot train), so the line only misleads.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def warn_once(message: str) -> None:
    """Say plainly, once per run, that a feature is unavailable here and what is used instead."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=2)


def configure_cuda_allocator() -> None:
    """Before any CUDA allocation: PyTorch's expandable segments for the caching allocator, unless the user set
    PYTORCH_CUDA_ALLOC_CONF. The dynamic KV cache makes each layer's keys and values one token longer at every
    decode step; on the H200 (bench/RESULTS.md, 2026-12-04) the allocator then held 23.3 GiB reserved for 5.8 GiB
    allocated, and expandable segments grow a segment in place instead of keeping each outgrown block."""
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def language_model_lora_pattern(target_modules: list[str]) -> str:
    """A peft `target_modules` regex restricted to the language model: the Qwen2.5-VL vision
    tower has `gate_proj`/`up_proj`/`down_proj` of its own, which stay frozen."""
    if "lm_head" in target_modules:
        raise ConfigError("lora_target_modules: 'lm_head' is not supported (the fused log-prob kernels read "
                          "the LM head's base weight; a LoRA there would be ignored)")
    return rf".*language_model.*\.({'|'.join(target_modules)})$"


def load_tokenizer(model: str, trust_remote_code: bool = False, tokenizer: str | None = None):
    """The tokenizer of `tokenizer` (or of `model`); an architecture-only model directory with no
    tokenizer files (the shipped 3B/7B configs) gets the tiny tokenizer, with a warning. A model directory's
    `chat_template.jinja` is the chat format either way (the shipped 3B/7B directories carry Qwen2.5-VL's)."""
    from transformers import AutoTokenizer

    from .config import TINY_MODEL_DIR

    source = tokenizer or model
    if tokenizer is None and Path(model).is_dir() and not any(Path(model).glob("tokenizer*")):
        source = str(TINY_MODEL_DIR)
        warn_once(f"{model} has no tokenizer files: using the tiny tokenizer ({source}); set `tokenizer` to change")
    try:
        loaded = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"tokenizer {source!r}: cannot load ({str(err).splitlines()[0]})") from None
    template = Path(model) / "chat_template.jinja"
    if source != model and template.is_file():
        # the model directory's chat format wins over that of tokenizer files from elsewhere (as a processor's
        # does): Qwen's text tokenizers render no images, which the VL template of a Qwen2.5-VL directory does
        loaded.chat_template = template.read_text()
    loaded.padding_side = "left"  # generation appends to the right of every prompt
    if loaded.pad_token_id is None:
        loaded.pad_token = loaded.eos_token
    return loaded


def load_image_processor(model: str, min_pixels: int, max_pixels: int):
    """The Qwen2-VL image processor (PIL backend: no torchvision needed) of `model`, or None when the
    model directory has no `preprocessor_config.json` (text-only use)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    try:
        processor = Qwen2VLImageProcessorPil.from_pretrained(model)
    except (OSError, ValueError):
        return None
    processor.min_pixels, processor.max_pixels = min_pixels, max_pixels
    processor.size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    return processor


def quantization_config(cfg: TrainConfig, model_config, compute_dtype: torch.dtype):
    """bitsandbytes settings for the language model's linear layers only: every module outside the
    language model (the vision tower, the LM head) is listed as skipped, so it stays in `dtype`."""
    from transformers import BitsAndBytesConfig

    skip = ["lm_head", "model.visual", "visual"]
    if cfg.quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)


def attention_implementation(device: torch.device) -> str:
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            return "sdpa"
    return "sdpa"


def patch_with_liger(device: torch.device) -> None:
    """Liger's Triton RMSNorm, SwiGLU and RoPE for Qwen2.5-VL (CUDA only; its losses are not used), its RMSNorm
    and SwiGLU MLP in the form that steps aside under torch.compile (`liger_modules_outside_compile`)."""
    if device.type != "cuda":
        return
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2_5_vl
        from liger_kernel.transformers.rms_norm import LigerRMSNorm
        from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    except ImportError:
        warn_once("liger-kernel is not installed: Qwen2.5-VL runs without its fused RMSNorm/SwiGLU/RoPE")
        return
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling

    hf_rope = getattr(modeling, "apply_multimodal_rotary_pos_emb", None)
    hf_rope = getattr(hf_rope, "hf_rope", hf_rope)  # a second load: transformers' own, not our earlier wrapper
    try:
        apply_liger_kernel_to_qwen2_5_vl(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                         fused_linear_cross_entropy=False)
    except ImportError as err:  # a liger-kernel built for other transformers versions (0.8.5 with 5.25)
        warn_once(f"liger-kernel does not fit this transformers ({err}): Qwen2.5-VL runs without its kernels")
        return
    rms_norm, swiglu_mlp = liger_modules_outside_compile()
    for name, liger, ours in (("Qwen2RMSNorm", LigerRMSNorm, rms_norm), ("Qwen2_5_VLRMSNorm", LigerRMSNorm, rms_norm),
                              ("Qwen2MLP", LigerSwiGLUMLP, swiglu_mlp)):
        if getattr(modeling, name, None) is liger:
            setattr(modeling, name, ours)
    liger_rope = getattr(modeling, "apply_multimodal_rotary_pos_emb", None)
    if hf_rope is not None and liger_rope is not hf_rope:  # the transformers versions that still have it

        def rope(*args, **kwargs):
            return (hf_rope if torch.compiler.is_compiling() else liger_rope)(*args, **kwargs)

        rope.hf_rope = hf_rope
        modeling.apply_multimodal_rotary_pos_emb = rope


@functools.cache
def liger_modules_outside_compile() -> tuple[type, type]:
    """Liger's RMSNorm and SwiGLU MLP, which compute the same in plain torch while torch.compile traces them
    (the compiled decode cache): inductor fuses that form itself, whereas Liger's Triton RMSNorm inside a graph
    made inductor assume every input mutated and skip CUDA graphs (the H200, 2026-12-04, bench/RESULTS.md)."""
    import torch.nn.functional as F
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP

    class RMSNormOutsideCompile(LigerRMSNorm):
        def forward(self, hidden_states):
            if not torch.compiler.is_compiling():
                return super().forward(hidden_states)
            # Qwen2's RMSNorm, as Liger's "llama" casting computes it: fp32 statistics, the weight's multiply
            # on the input's dtype
            x = hidden_states.float()
            x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return self.weight * x.to(hidden_states.dtype)

    class SwiGLUMLPOutsideCompile(LigerSwiGLUMLP):
        def forward(self, x):
            if not torch.compiler.is_compiling():
                return super().forward(x)
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    return RMSNormOutsideCompile, SwiGLUMLPOutsideCompile


def random_model(config, seed: int, device: torch.device, **kwargs):
    """The architecture of `config` with seeded random weights, drawn on `device` when it is a GPU: there the 3B's
    3.75B values take a moment, on a CPU a minute or more (64 s on this 2-core CPU; the 3B's load took 150 s on the
    H200 machine with them drawn on its CPU, 2026-12-04). A seed gives the same weights on one kind of device and
    other ones on another: each has its own generator."""
    from transformers import AutoModelForImageTextToText

    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda_devices), torch.device(device if cuda_devices else "cpu"):
        torch.manual_seed(seed)
        return AutoModelForImageTextToText.from_config(config, **kwargs)


def save_random_weights(cfg: TrainConfig, device: torch.device, directory: str | Path) -> None:
    """Write `cfg.model`'s architecture with random weights (`random_model`) into `directory` as a model directory
    that loads like pretrained weights; the GPU memory it used is handed back."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
    model = random_model(config, cfg.seed, device, dtype=pick_dtype(cfg.dtype, device),
                         trust_remote_code=cfg.trust_remote_code)
    model.save_pretrained(directory)
    del model
    release_cuda_cache(device)


def release_cuda_cache(device: torch.device) -> None:
    """Hand the allocator's cached blocks back to the GPU (a no-op elsewhere), so later peaks start clean."""
    if device.type == "cuda":
        import gc
        gc.collect()
        torch.cuda.empty_cache()


def load_base_model(cfg: TrainConfig, device: torch.device):
    """The base model, from pretrained weights or (random_init) from its config alone, with the
    language model quantised as configured. Where 4/8-bit cannot run here it says so once and loads
    in `dtype` instead."""
    import tempfile

    from transformers import AutoConfig, AutoModelForImageTextToText

    dtype = pick_dtype(cfg.dtype, device)
    patch_with_liger(device)
    kwargs = dict(dtype=dtype, trust_remote_code=cfg.trust_remote_code, attn_implementation=attention_implementation(device))
    try:
        config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
        with tempfile.TemporaryDirectory() as scratch:
            source = cfg.model
            if cfg.random_init:
                if cfg.quantization == "none":
                    return random_model(config, cfg.seed, device, **kwargs).to(device)
                save_random_weights(cfg, device, scratch)  # quantisation happens on load: reload the random weights
                source = scratch
            if cfg.quantization != "none":
                try:
                    model = AutoModelForImageTextToText.from_pretrained(
                        source, quantization_config=quantization_config(cfg, config, dtype), device_map={"": device},
                        use_safetensors=True, **kwargs)
                    for module in model.modules():
                        # bitsandbytes repacks 4-bit weights for CPU inference in eval mode; the packed
                        # path cannot train, and a GRPO step alternates generation and training.
                        if hasattr(module, "support_avx512bf16_for_cpu"):
                            module.support_avx512bf16_for_cpu = False
                    return model
                except (ImportError, RuntimeError, NotImplementedError) as err:
                    warn_once(f"quantization={cfg.quantization} cannot run on {device.type} here "
                              f"({str(err).splitlines()[0][:120]}); loading the weights in {dtype} instead")
            return AutoModelForImageTextToText.from_pretrained(source, use_safetensors=True, **kwargs).to(device)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model {cfg.model!r}: cannot load ({str(err).splitlines()[0]})") from None


def make_optimizer(params, cfg: TrainConfig):
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    if cfg.optim == "paged_adamw_8bit":
        try:
            import bitsandbytes as bnb
            return bnb.optim.PagedAdamW8bit(params, **kwargs)
        except (ImportError, RuntimeError) as err:
            warn_once(f"optim=paged_adamw_8bit is unavailable here ({str(err).splitlines()[0][:100]}); using AdamW")
    return torch.optim.AdamW(params, **kwargs)


def add_lora(model, cfg: TrainConfig):
    """Wrap `model` in a peft LoRA on the language model's linear layers; everything else frozen."""
    from peft import LoraConfig, get_peft_model

    # No task type, and the base class named in `auto_mapping`: peft's AutoPeftModelForCausalLM cannot load a
    # Qwen2.5-VL (AutoModelForCausalLM does not map its config), while `peft.AutoPeftModel.from_pretrained(dir)`
    # rebuilds exactly this class from the saved adapter_config.json.
    base_class = type(model)
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=language_model_lora_pattern(cfg.lora_target_modules), task_type=None,
                      auto_mapping={"base_model_class": base_class.__name__, "parent_library": base_class.__module__})
    policy = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        # Non-reentrant: with peft's frozen inputs, reentrant checkpointing yields no gradients.
        # Transformers applies it only in train mode, so generation (eval mode) keeps its KV cache.
        base, kwargs = policy.get_base_model(), {"use_reentrant": False,
                                                 "context_fn": recompute_with_forward_casting(policy)}
        if hasattr(base, "activation_checkpointing_enable"):  # transformers' name since 5.2x; the old one warns
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:  # the H200 image's 5.17
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return policy


def recompute_with_forward_casting(policy):
    """torch checkpoint's `context_fn`: the backward recomputes each layer with peft's input casting as it was
    in that layer's forward. The recompute runs in backward, outside `lora_autocast`'s context; torch restores
    autocast there but not peft's switch, so without this peft's fp32 casts came back in every recomputed
    LoRA layer over a bf16 base, and on a CPU over a 4-bit one (peft's 4-bit layer skips them by itself only
    under CUDA's autocast): an fp32 copy of each input, then autocast's bf16 copy of it (tests/test_models.py)."""
    tuners = peft_layers(policy)

    def context_fn():  # called in the forward of each checkpointed layer; the second context wraps its recompute
        return contextlib.nullcontext(), input_casting(tuners, tuners[0].cast_input_dtype_enabled if tuners else True)
    return context_fn


def peft_layers(policy) -> list:
    """The peft tuner layers of `policy` (each with peft's `cast_input_dtype_enabled` switch)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in policy.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def input_casting(tuners: list, enabled: bool):
    """Inside: peft's casting of each LoRA layer's input to its weights' dtype on or off in `tuners`; restored on
    exit."""
    before = [m.cast_input_dtype_enabled for m in tuners]
    for module in tuners:
        module.cast_input_dtype_enabled = enabled
    try:
        yield
    finally:
        for module, was in zip(tuners, before):
            module.cast_input_dtype_enabled = was


def load_adapter_weights(policy, adapter_dir: Path) -> None:
    """Copy a saved adapter's LoRA weights into `policy` (same rank and targets required)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(Path(adapter_dir) / "adapter_model.safetensors", device=str(policy.device))
    try:
        result = set_peft_model_state_dict(policy, weights)
    except RuntimeError as err:
        raise ConfigError(f"init {adapter_dir}: its LoRA shapes do not match this config's lora_r/targets "
                          f"({str(err).splitlines()[0][:100]})") from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise ConfigError(f"init {adapter_dir}: {len(missing)} LoRA weights missing (different lora_target_modules?)")


def unwrap(policy):
    """The transformers model under a peft wrapper (a bare model is returned as it is)."""
    return policy.get_base_model() if hasattr(policy, "get_base_model") else policy


def backbone(policy):
    """The module whose forward returns last hidden states (LoRA layers included): `model.model`."""
    return unwrap(policy).model


@contextlib.contextmanager
def lora_autocast(policy, enabled: bool = True):
    """Inside: a LoRA side path on a bf16 model computed in bf16, its fp32 weights cast once per call by
    autocast (and their gradients returned in fp32, the optimizer's master copy), as TRL's bf16 training
    does. Without it peft casts each layer's input to fp32, runs the two small GEMMs in fp32, adds the bf16
    base output to an fp32 result and casts that back: three activation-sized copies per LoRA layer, forward
    and backward (the training pass 134 -> 104 s without them at the real shape, bench/RESULTS.md). The
    model's activations decide, not the base's storage: a 4-bit or 8-bit base computing in bf16 (the 3B
    configs) gets it too. A no-op unless the activations are bf16 and the LoRA's weights fp32. Wrap only
    the model's forward: autocast would also lower the log-prob kernels' fp32."""
    layer = next((m for m in policy.modules() if getattr(m, "lora_A", None)), None) if enabled else None
    activations = unwrap(policy).get_input_embeddings().weight.dtype if layer is not None else None
    lora = next(iter(layer.lora_A.values())).weight if layer is not None else None
    if activations != torch.bfloat16 or lora.dtype != torch.float32:
        yield
        return
    with torch.autocast(lora.device.type, dtype=torch.bfloat16), input_casting(peft_layers(policy), False):
        yield


def lm_head_weight(policy) -> torch.Tensor:
    return unwrap(policy).get_output_embeddings().weight


def multimodal_token_types(input_ids: torch.Tensor, config) -> torch.Tensor:
    """Qwen2.5-VL's `mm_token_type_ids`: 1 at image placeholders, 2 at video placeholders, else 0. Given to the
    model with the images, it places image tokens by their 3-D (time, height, width) rotary positions as the
    pretrained model expects; without them every token gets 1-D text positions."""
    types = torch.zeros_like(input_ids, dtype=torch.int32)
    types[input_ids == config.image_token_id] = 1
    types[input_ids == config.video_token_id] = 2
    return types


def stack_vision(vision: list) -> dict:
    """pixel_values / image_grid_thw of these rows' images, in row order (empty for text-only rows)."""
    rows = [v for v in vision if v is not None]
    if not rows:
        return {}
    return {"pixel_values": torch.cat([v["pixel_values"] for v in rows]),
            "image_grid_thw": torch.cat([v["image_grid_thw"] for v in rows])}


def prefill_positions(model, input_ids, attention_mask, vision: dict, mm_token_type_ids=None) -> torch.Tensor:
    """`[4, B, P]` positions as HF `generate` builds them for Qwen2.5-VL: row 0 the text positions
    (`cumsum(mask) - 1`, 0 on padding), rows 1-3 the rotary (temporal, height, width) positions:
    the 3-D multimodal ones from `get_rope_index` when `mm_token_type_ids` are given with images,
    else the text positions."""
    text = (attention_mask.long().cumsum(-1) - 1).masked_fill_(attention_mask == 0, 0)
    if mm_token_type_ids is not None and vision.get("image_grid_thw") is not None:
        rope, _ = unwrap(model).model.get_rope_index(
            input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=vision["image_grid_thw"],
            attention_mask=attention_mask)
    else:
        rope = text[None].expand(3, -1, -1)
    return torch.cat([text[None], rope.to(text.device)], dim=0)


def cache_keyword(body) -> str:
    """The KV-cache argument's name of `body.forward` (`cache` since transformers 5.2x, `past_key_values` before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"


def hidden_states(policy, input_ids: torch.Tensor, attention_mask: torch.Tensor, **vision) -> torch.Tensor:
    """Last hidden states `[B, L, H]` of the backbone (no logits); with images, at their 3-D positions."""
    if vision.get("image_grid_thw") is not None:
        vision = {**vision, "mm_token_type_ids": multimodal_token_types(input_ids, unwrap(policy).config)}
    out = backbone(policy)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **vision)
    return out.last_hidden_state


def completion_hidden(policy, batch, share_prompt: bool = True) -> torch.Tensor:
    """Hidden states at the positions that predict each completion token of a `Rollout`: `[n, C, H]`.

    With `share_prompt` and the rows' prompt indices known (`batch.prompt_index`), each prompt of the
    micro-batch is computed once and its G completions attend to its keys and values
    (`shared_prompt_hidden`); otherwise every row runs its own copy of the prompt."""
    if share_prompt and getattr(batch, "prompt_index", None) is not None:
        return shared_prompt_hidden(policy, batch)
    prompt_len = batch.prompt_ids.shape[1]
    hidden = hidden_states(policy, batch.input_ids, batch.attention_mask, **batch.vision_kwargs())
    return hidden[:, prompt_len - 1: -1]


@functools.cache
def _prompt_kv_classes():
    from transformers.cache_utils import DynamicLayer

    class PromptKV(DynamicLayer):
        """One attention layer's keys/values of a micro-batch's prompts, written by the prompt pass. The
        first write is kept and returned as it is; a checkpointed layer writes again when backward
        recomputes it, and that write changes nothing."""

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.device, self.is_initialized = key_states.device, True
                self.keys, self.values = key_states, value_states
            return key_states, value_states

    class SharedPromptKV(DynamicLayer):
        """The completion pass's view of a `PromptKV`: row r attends to its prompt's (`rows[r]`) keys/values
        followed by its own. Gathered on every call (a recompute sees the same) and never stored; the
        gather's backward sums the gradients of a prompt's G completions into its one computation."""

        def __init__(self, prompt: PromptKV, rows: torch.Tensor):
            super().__init__()
            self.prompt, self.rows, self.is_initialized = prompt, rows, True

        def update(self, key_states, value_states, *args, **kwargs):
            return (torch.cat([self.prompt.keys.index_select(0, self.rows), key_states], dim=-2),
                    torch.cat([self.prompt.values.index_select(0, self.rows), value_states], dim=-2))

        def get_seq_length(self) -> int:
            return self.prompt.keys.shape[-2]

    return PromptKV, SharedPromptKV


class _CacheThroughCheckpointing:
    """Lets HF's checkpointed decoder layers keep a cache argument (they drop it by default, because a
    cache that is written to would be written twice when backward recomputes the layer; `PromptKV` is
    safe to write twice)."""

    def __init__(self, policy):
        from transformers.modeling_layers import GradientCheckpointingLayer

        self.layers = [m for m in backbone(policy).language_model.modules() if isinstance(m, GradientCheckpointingLayer)]

    def __enter__(self):
        for layer in self.layers:
            layer._can_checkpoint_with_cache = True

    def __exit__(self, *exc):
        for layer in self.layers:
            del layer._can_checkpoint_with_cache  # back to the class's False


def shared_prompt_hidden(policy, batch) -> torch.Tensor:
    """`completion_hidden` with each prompt computed once per group (Unsloth calls it prefix grouping).

    1. Prompt pass: the distinct prompts of these rows (consecutive rows with one `prompt_index`),
       columns that are padding in all of them dropped, images through the vision encoder once, at
       the positions generation gave them; every layer's keys/values kept (`PromptKV`).
    2. Completion pass: the rows' completion tokens (all but the last, which predicts nothing), at
       positions continuing their prompt's, attending to their prompt's keys/values and to their own.
    The hidden state that predicts the first completion token is the prompt's last one. Equal to the
    unshared computation up to fp32 rounding (tests/test_shared_prompt.py), at B·P + n·C tokens
    instead of n·(P + C), and with gradient checkpointing still on in the training pass."""
    from transformers.cache_utils import Cache

    _, row_group, counts = torch.unique_consecutive(batch.prompt_index, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts  # first row of each prompt
    prompt_ids, prompt_mask = batch.prompt_ids[starts], batch.prompt_mask[starts]  # [B, P]
    first_real = int((prompt_mask.sum(0) > 0).nonzero()[0])  # left padding shared by all of them
    prompt_ids, prompt_mask = prompt_ids[:, first_real:], prompt_mask[:, first_real:]
    vision = stack_vision([batch.vision[i] for i in starts.tolist()])
    config = unwrap(policy).config
    types = multimodal_token_types(prompt_ids, config) if vision else None
    positions = prefill_positions(policy, prompt_ids, prompt_mask, vision, types)  # [4, B, P]
    body = backbone(policy)
    cache_kw = cache_keyword(body)
    prompt_kv, shared_kv = _prompt_kv_classes()
    layers = [prompt_kv() for _ in range(config.get_text_config().num_hidden_layers)]
    completion_ids, completion_mask = batch.completion_ids, batch.completion_mask  # [n, C]
    with _CacheThroughCheckpointing(policy):
        out = body(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions, use_cache=True,
                   **{cache_kw: Cache(layers=layers)}, **vision)
        first = out.last_hidden_state[:, -1].index_select(0, row_group)[:, None]  # [n, 1, H]
        if completion_ids.shape[1] == 1:
            return first
        steps = torch.arange(1, completion_ids.shape[1], device=positions.device)
        later = positions[..., -1:].index_select(1, row_group) + steps  # [4, n, C-1]
        mask = torch.cat([prompt_mask.index_select(0, row_group), completion_mask[:, :-1]], dim=1)  # [n, P + C-1]
        # a second cache object: backward's recompute of a prompt-pass layer must still find the writer
        shared = Cache(layers=[shared_kv(layer, row_group) for layer in layers])
        out = body(input_ids=completion_ids[:, :-1], attention_mask=mask, position_ids=later, use_cache=True,
                   **{cache_kw: shared})
    return torch.cat([first, out.last_hidden_state], dim=1)


def save_base_model(model, tokenizer, out_dir: Path, source: str | None = None) -> None:
    """A random-init base is saved beside the adapter, so `PeftModel.from_pretrained` can find it
    (with the source directory's image-processor config, so it loads like a real checkpoint)."""
    import shutil

    out_dir = Path(out_dir)
    partial = out_dir.with_name(out_dir.name + ".tmp")  # renamed into place when complete
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if source and (Path(source) / "preprocessor_config.json").is_file():
        shutil.copy(Path(source) / "preprocessor_config.json", partial / "preprocessor_config.json")
    partial.rename(out_dir)

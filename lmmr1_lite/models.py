"""Loading the policy: a Qwen2.5-VL-class model with LoRA on its language model.

The reference policy is the same module with the adapter disabled (`policy.disable_adapter()`),
so there is one copy of the weights. Log-probs never go through the model's `lm_head` call:
`hidden_states` returns the backbone's last hidden states and the kernels take the LM head's
weight directly, so the `[tokens, vocab]` logits are never materialised.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch

from .config import ConfigError, TrainConfig

_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Say plainly, once per run, that a feature is unavailable here and what is used instead."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=2)


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


def load_tokenizer(model: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model {model!r}: cannot load a tokenizer ({str(err).splitlines()[0]})") from None
    tokenizer.padding_side = "left"  # generation appends to the right of every prompt
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(cfg: TrainConfig, device: torch.device):
    """The base model, from pretrained weights or (random_init) from its config alone."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    dtype = pick_dtype(cfg.dtype, device)
    try:
        if cfg.random_init:
            config = AutoConfig.from_pretrained(cfg.model, trust_remote_code=cfg.trust_remote_code)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(cfg.seed)
                model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
        else:
            model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=dtype, use_safetensors=True,
                                                                trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model {cfg.model!r}: cannot load ({str(err).splitlines()[0]})") from None
    return model.to(device)


def add_lora(model, cfg: TrainConfig):
    """Wrap `model` in a peft LoRA on the language model's linear layers; everything else frozen."""
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=language_model_lora_pattern(cfg.lora_target_modules), task_type="CAUSAL_LM")
    policy = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        # Non-reentrant: with peft's frozen inputs, reentrant checkpointing yields no gradients.
        # Transformers applies it only in train mode, so generation (eval mode) keeps its KV cache.
        policy.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return policy


def backbone(policy):
    """The module whose forward returns last hidden states (LoRA layers included): `model.model`."""
    return policy.get_base_model().model


def lm_head_weight(policy) -> torch.Tensor:
    return policy.get_base_model().get_output_embeddings().weight


def hidden_states(policy, input_ids: torch.Tensor, attention_mask: torch.Tensor, **vision) -> torch.Tensor:
    """Last hidden states `[B, L, H]` of the backbone (no logits)."""
    out = backbone(policy)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **vision)
    return out.last_hidden_state


def save_base_model(model, tokenizer, out_dir: Path) -> None:
    """A random-init base is saved beside the adapter, so `PeftModel.from_pretrained` can find it."""
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

"""Rollouts: G completions per prompt, from a decode loop of our own over the HF model and its KV cache.

Why a loop and not HF `generate` with a logits processor: three of the things a rollout needs are
outside what `generate` lets a processor change. `generate(num_return_sequences=G)` expands the batch
*before* the prefill, so every prompt (and its images, through the vision encoder) is prefilled G
times; it carries finished rows to the longest one, feeding them pad tokens; and it samples with
`torch.multinomial`, whose `exponential_` draw over Qwen's 151,936-token vocabulary costs more than
a small model's decode forward. The loop is short and uses only the model's public pieces.

Three modules, one job each: this one (the `Rollout` batch, prompt encoding, stop ids, `generate`
and the HF reference `generate_hf`), `decoding` (the decode loop `decode`: one prefill per prompt, a
KV cache shared by its G rows, finished rows leaving the batch; stop strings) and `sampling` (the
sampler `next_tokens`: temperature, top-k, top-p, one inverse-CDF draw per row). Their public names
are importable from here too.

Greedy decoding gives the same tokens as HF `generate(do_sample=False)` (tests/test_sampling.py).
Every row also records the log-prob of its tokens under the full temperature softmax, the quantity
the training pass computes (`Rollout.logprobs`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from jinja2 import TemplateError

from . import models
from .config import ConfigError
from .decoding import StaticDecodeStep, StopStrings, decode, split_stop_strings  # noqa: F401  (re-exported)
from .models import warn_once
from .sampling import (SAMPLE_BLOCK, SAMPLE_CHUNK_BYTES, filter_top_k_top_p_,  # noqa: F401  (re-exported)
                       inverse_cdf_sample, next_tokens)


@dataclass
class Rollout:
    """A batch of N = B * G sequences; row i belongs to prompt i // G."""
    prompt_ids: torch.Tensor       # [N, P] left-padded
    prompt_mask: torch.Tensor      # [N, P]
    completion_ids: torch.Tensor   # [N, C] right-padded
    completion_mask: torch.Tensor  # [N, C] 1 up to and including the first stop token
    texts: list[str]               # decoded completions (masked part, special tokens skipped)
    # per row: that prompt's {"pixel_values", "image_grid_thw"} (shared by its G rows, not copied) or None
    vision: list = field(default_factory=list)
    # [N, C] float32 log-prob of each completion token under the full temperature softmax at generation
    # time (0 where the mask is 0), or None when the rollout did not come from `generate`
    logprobs: torch.Tensor | None = None
    # [N] bool: the row reached max_new_tokens without a stop (TRL's "clipped"), or None when unknown
    clipped: torch.Tensor | None = None
    # [N] int64: which prompt each row continues (consecutive rows of one value share it), or None when
    # unknown; with it the log-prob passes compute each prompt once (models.shared_prompt_hidden)
    prompt_index: torch.Tensor | None = None

    def vision_kwargs(self) -> dict:
        return models.stack_vision(self.vision)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)

    @staticmethod
    def concat(parts: list["Rollout"], pad_id: int) -> "Rollout":
        """Stack rollouts of different lengths: prompts left-padded, completions right-padded."""
        if len(parts) == 1:
            return parts[0]
        prompt_len = max(p.prompt_ids.shape[1] for p in parts)
        completion_len = max(p.completion_ids.shape[1] for p in parts)
        pad = torch.nn.functional.pad
        return Rollout(
            torch.cat([pad(p.prompt_ids, (prompt_len - p.prompt_ids.shape[1], 0), value=pad_id) for p in parts]),
            torch.cat([pad(p.prompt_mask, (prompt_len - p.prompt_mask.shape[1], 0)) for p in parts]),
            torch.cat([pad(p.completion_ids, (0, completion_len - p.completion_ids.shape[1]), value=pad_id) for p in parts]),
            torch.cat([pad(p.completion_mask, (0, completion_len - p.completion_mask.shape[1])) for p in parts]),
            [t for p in parts for t in p.texts], [v for p in parts for v in p.vision],
            None if any(p.logprobs is None for p in parts) else
            torch.cat([pad(p.logprobs, (0, completion_len - p.logprobs.shape[1])) for p in parts]),
            None if any(p.clipped is None for p in parts) else torch.cat([p.clipped for p in parts]),
            None if any(p.prompt_index is None for p in parts) else torch.cat(offset_prompt_indices(parts)))

    def rows(self, index: slice | torch.Tensor) -> "Rollout":
        """These rows: a slice, or a 1-D tensor of row numbers."""
        pick = (lambda items: items[index]) if isinstance(index, slice) else \
            (lambda items: [items[i] for i in index.tolist()])
        return Rollout(self.prompt_ids[index], self.prompt_mask[index], self.completion_ids[index],
                       self.completion_mask[index], pick(self.texts), pick(self.vision),
                       None if self.logprobs is None else self.logprobs[index],
                       None if self.clipped is None else self.clipped[index],
                       None if self.prompt_index is None else self.prompt_index[index])


def offset_prompt_indices(parts: list[Rollout]) -> list[torch.Tensor]:
    """The parts' `prompt_index` renumbered so that no two parts share a prompt."""
    out, offset = [], 0
    for part in parts:
        out.append(part.prompt_index + offset)
        offset += int(part.prompt_index.max()) + 1 if part.prompt_index.numel() else 0
    return out


class MergedLinear(torch.nn.Linear):
    """A dense stand-in for a LoRA layer's base linear while generating: its weight the base's (dequantised when
    4/8-bit) plus the LoRA delta; input and output keep the caller's dtype, as a bitsandbytes layer's do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


def merged_weight(base, delta: torch.Tensor) -> torch.Tensor:
    """fp32 `W + delta` of a base linear, `W` dequantised when `base` is a bitsandbytes Linear4bit/Linear8bitLt."""
    if base.weight.dtype.is_floating_point:
        return base.weight.float() + delta
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(base.weight, getattr(base, "state", None)).float() + delta


@contextmanager
def adapter_merged(policy, keep: bool = False):
    """Inside: each LoRA layer's base linear replaced by a dense `MergedLinear` of W + scaling * B A (summed in
    fp32, rounded to W's dtype, or to the model's dtype, the embeddings', for a 4/8-bit W, which is dequantised)
    and the adapters disabled, so a forward runs one GEMM per layer instead of three, with no dequantisation;
    on exit the original modules come back untouched (merging in place and unmerging would round W twice and let
    it drift step after step). The copies cost the adapted weights in that dtype while generating.

    `keep`: the copies stay allocated between calls (held on the policy, outside its modules and state dict)
    and are refreshed in place, so every call generates from the same tensors at the same addresses, which a
    compiled decode step's CUDA graphs need (new weights each call would make them record again); the price
    is holding the copies through training too (the planner counts it for decode_cache 'compiled')."""
    from peft.tuners.lora import LoraLayer

    layers = [m for m in policy.modules() if isinstance(m, LoraLayer) and m.active_adapters]
    if not keep:
        policy.__dict__.pop("_merged_rollout_copies", None)
    if not layers:
        yield
        return
    kept = policy.__dict__.setdefault("_merged_rollout_copies", {}) if keep else {}
    model_dtype = policy.get_input_embeddings().weight.dtype
    originals = []  # (LoRA layer, its base linear) to put back on exit
    with torch.no_grad():
        for layer in layers:
            base = layer.get_base_layer()
            dtype = base.weight.dtype if base.weight.dtype.is_floating_point else model_dtype
            weight = merged_weight(base, sum(layer.get_delta_weight(name).float()
                                             for name in layer.active_adapters if name in layer.lora_A))
            dense = kept.get(layer)
            if dense is None or dense.weight.dtype != dtype or dense.weight.shape != weight.shape:
                dense = MergedLinear(base.in_features, base.out_features, bias=False, device="meta")
                dense.weight = torch.nn.Parameter(weight.to(dtype), requires_grad=False)
                if keep:
                    kept[layer] = dense
            else:
                dense.weight.copy_(weight)  # rounded to its dtype, in place: the same address every call
            dense.bias = base.bias  # shared, not copied
            del weight
            originals.append((layer, layer.base_layer))
            layer.base_layer = dense
    try:
        with policy.disable_adapter():
            yield
    finally:
        for layer, base in originals:
            layer.base_layer = base


def stop_token_ids(tokenizer, stop_tokens: list[str]) -> list[int]:
    """EOS plus each configured stop string that is a single token of this tokenizer."""
    ids = [tokenizer.eos_token_id]
    for text in stop_tokens:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) == 1:
            ids.append(encoded[0])
        else:
            warn_once(f"stop token {text!r} is {len(encoded)} tokens for this tokenizer; ignored, "
                      "completions stop at EOS")
    return sorted(set(ids))


def completion_mask(completion_ids: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
    """`[N, C]` mask: 1 up to and including the first stop token of each row, 0 after it."""
    is_stop = torch.isin(completion_ids, torch.tensor(stop_ids, device=completion_ids.device))
    stops_before = torch.cumsum(is_stop.int(), dim=1) - is_stop.int()  # stops strictly before each position
    return (stops_before == 0).long()


def images_of(messages: list[dict]) -> list:
    return [item["image"] for m in messages if isinstance(m["content"], list)
            for item in m["content"] if item.get("type") == "image"]


def encode_prompts(tokenizer, messages: list[list[dict]], device: torch.device, image_processor=None) -> tuple[dict, list]:
    """Token ids of the chat-formatted prompts (left-padded) and, per prompt, its vision inputs or None.

    Each image's single `<|image_pad|>` placeholder from the chat template is expanded to the image's
    token count (grid t*h*w / merge^2), as the Qwen2.5-VL processor does, so ids and features match."""
    texts, vision = [], []
    for conversation in messages:
        images = images_of(conversation)
        try:
            text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except TemplateError as err:  # a text model's template meets a message whose content is a list
            raise ConfigError(f"the tokenizer's chat template cannot render this prompt ({err})"
                              + ("; a prompt with images needs a vision chat template such as Qwen2.5-VL's "
                                 "(chat_template.jinja in the model directory)" if images else "")) from None
        if images:
            if image_processor is None:
                raise ValueError("a prompt has images but the model directory has no image processor config")
            processed = image_processor(images=images, return_tensors="pt")
            merge = image_processor.merge_size ** 2
            pieces = text.split(IMAGE_PAD)
            if len(pieces) != len(images) + 1:
                raise ValueError(f"chat template produced {len(pieces) - 1} image placeholders for {len(images)} images")
            counts = [int(thw.prod()) // merge for thw in processed["image_grid_thw"]]
            text = pieces[0] + "".join(IMAGE_PAD * n + rest for n, rest in zip(counts, pieces[1:]))
            vision.append({"pixel_values": processed["pixel_values"].to(device),
                           "image_grid_thw": processed["image_grid_thw"].to(device)})
        else:
            vision.append(None)
        texts.append(text)
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device), vision


IMAGE_PAD = "<|image_pad|>"
PLACEHOLDERS = (IMAGE_PAD, "<|video_pad|>", "<|vision_start|>", "<|vision_end|>")


def placeholder_ids(tokenizer) -> list[int]:
    """Vision placeholder tokens: never sampled, or the training pass would count an image the prompt
    never had ("image features and image tokens do not match")."""
    ids = []
    for token in PLACEHOLDERS:  # not get_vocab(): that builds a 151k-entry dict (0.2 s) per call
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and tokenizer.convert_ids_to_tokens(token_id) == token:
            ids.append(token_id)
    return ids


@torch.no_grad()
def generate(policy, tokenizer, messages: list[list[dict]], *, num_generations: int, max_new_tokens: int,
             temperature: float, stop_ids: list[int], greedy: bool = False, image_processor=None,
             top_k: int = 0, top_p: float = 1.0, stop_strings: list[str] | tuple = (),
             generator: torch.Generator | None = None, cache_mode: str = "dynamic",
             lora_autocast: bool = False, deadline: float | None = None) -> Rollout:
    """Sample `num_generations` completions for each prompt (greedy: one, argmax).

    Each prompt is prefilled once (images through the vision encoder once) and its KV cache shared
    by its G rows; rows leave the batch when they stop. A row stops at any of `stop_ids` or at the
    end of any of `stop_strings` (several tokens allowed; single-token ones act as stop ids); its
    mask covers the stop. `top_k` (0: off) and `top_p` (1.0: off) filter as HF's warpers do.
    `lora_autocast`: the LoRA side path in bf16, as in the training pass (`decoding.decode`); the training
    step's rollouts follow the config's `lora_autocast`, evaluation keeps peft's fp32 side path. `deadline`
    (`time.monotonic()`): no decode step starts after it; the rows it cuts are `clipped`."""
    was_training = policy.training
    policy.eval()  # eval mode: gradient checkpointing off, KV cache on
    try:
        enc, vision = encode_prompts(tokenizer, messages, policy.device, image_processor)
        count = 1 if greedy else num_generations
        single, multi = split_stop_strings(tokenizer, stop_strings)
        images = models.stack_vision(vision)
        types = (models.multimodal_token_types(enc["input_ids"], models.unwrap(policy).config)
                 if images else None)  # 3-D rotary positions for image tokens, as in the training pass
        completion_ids, lengths, logprobs = decode(
            policy, enc["input_ids"], enc["attention_mask"], images, mm_token_type_ids=types, count=count,
            max_new_tokens=max_new_tokens, temperature=temperature, stop_ids=list(stop_ids) + single,
            pad_id=tokenizer.pad_token_id, greedy=greedy, top_k=top_k, top_p=top_p,
            suppress=placeholder_ids(tokenizer), stop_strings=StopStrings(tokenizer, multi), generator=generator,
            cache_mode=cache_mode, lora_autocast=lora_autocast, deadline=deadline)
    finally:
        policy.train(was_training)
    if completion_ids.shape[1] == 0:
        warn_once("generate returned no new tokens")
    mask = (torch.arange(completion_ids.shape[1], device=lengths.device)[None, :] < lengths[:, None]).long()
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    # at the cap (or cut by the deadline, at the longest row's length): clipped unless its last token ended it
    clipped = lengths >= completion_ids.shape[1]
    if bool(clipped.any()) and completion_ids.shape[1]:
        last = completion_ids[:, -1]
        ended = torch.isin(last, torch.tensor(list(stop_ids) + single, dtype=torch.long, device=last.device))
        stops = StopStrings(tokenizer, multi)
        if stops:
            ended |= stops(completion_ids.cpu()).to(last.device)
        clipped &= ~ended
    prompt_index = torch.arange(len(messages), device=lengths.device).repeat_interleave(count)
    return Rollout(enc["input_ids"].repeat_interleave(count, dim=0), enc["attention_mask"].repeat_interleave(count, dim=0),
                   completion_ids, mask, texts, [v for v in vision for _ in range(count)], logprobs, clipped,
                   prompt_index)


@torch.no_grad()
def generate_hf(policy, tokenizer, messages: list[list[dict]], *, num_generations: int, max_new_tokens: int,
                temperature: float, stop_ids: list[int], greedy: bool = False, image_processor=None,
                **generate_kwargs) -> Rollout:
    """The previous path, kept as the reference the tests and bench/ compare against: HF `generate`
    with `num_return_sequences` (each prompt prefilled once per completion), `torch.multinomial`
    sampling, finished rows carried to the longest. No log-probs."""
    was_training = policy.training
    policy.eval()
    enc, vision = encode_prompts(tokenizer, messages, policy.device, image_processor)
    enc.update(models.stack_vision(vision))
    if "image_grid_thw" in enc:  # the same 3-D image positions as `generate` and the training pass
        enc["mm_token_type_ids"] = models.multimodal_token_types(enc["input_ids"], models.unwrap(policy).config)
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    count = 1 if greedy else num_generations
    if generate_kwargs.get("stop_strings"):
        generate_kwargs.setdefault("tokenizer", tokenizer)  # HF's StopStringCriteria needs it
    out = policy.generate(**enc, **sampling, max_new_tokens=max_new_tokens, num_return_sequences=count,
                          use_cache=True, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                          suppress_tokens=placeholder_ids(tokenizer) or None, **generate_kwargs)
    policy.train(was_training)
    prompt_len = enc["input_ids"].shape[1]
    completion_ids = out[:, prompt_len:]
    mask = completion_mask(completion_ids, stop_ids)
    texts = tokenizer.batch_decode(completion_ids * mask + tokenizer.pad_token_id * (1 - mask),
                                   skip_special_tokens=True)
    return Rollout(enc["input_ids"].repeat_interleave(count, dim=0), enc["attention_mask"].repeat_interleave(count, dim=0),
                   completion_ids, mask, texts, [v for v in vision for _ in range(count)])

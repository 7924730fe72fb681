"""Rollouts: G completions per prompt with HF `generate` and its KV cache."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .models import warn_once


def stack_vision(vision: list) -> dict:
    """pixel_values / image_grid_thw of these rows' images, in row order (empty for text-only rows)."""
    rows = [v for v in vision if v is not None]
    if not rows:
        return {}
    return {"pixel_values": torch.cat([v["pixel_values"] for v in rows]),
            "image_grid_thw": torch.cat([v["image_grid_thw"] for v in rows])}


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

    def vision_kwargs(self) -> dict:
        return stack_vision(self.vision)

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
            [t for p in parts for t in p.texts], [v for p in parts for v in p.vision])

    def rows(self, index: slice) -> "Rollout":
        return Rollout(self.prompt_ids[index], self.prompt_mask[index], self.completion_ids[index],
                       self.completion_mask[index], self.texts[index], self.vision[index])


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
        text = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        images = images_of(conversation)
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
    vocab = tokenizer.get_vocab()
    return [vocab[t] for t in PLACEHOLDERS if t in vocab]


@torch.no_grad()
def generate(policy, tokenizer, messages: list[list[dict]], *, num_generations: int, max_new_tokens: int,
             temperature: float, stop_ids: list[int], greedy: bool = False, image_processor=None) -> Rollout:
    """Sample `num_generations` completions for each prompt (greedy: one, argmax). Every completion of
    a prompt sees the same images; each prompt is prefilled once per completion by HF generate."""
    was_training = policy.training
    policy.eval()  # eval mode: gradient checkpointing off, KV cache on
    enc, vision = encode_prompts(tokenizer, messages, policy.device, image_processor)
    enc.update(stack_vision(vision))
    sampling = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    count = 1 if greedy else num_generations
    out = policy.generate(**enc, **sampling, max_new_tokens=max_new_tokens, num_return_sequences=count,
                          use_cache=True, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                          suppress_tokens=placeholder_ids(tokenizer) or None)
    policy.train(was_training)
    prompt_len = enc["input_ids"].shape[1]
    completion_ids = out[:, prompt_len:]
    if completion_ids.shape[1] == 0:
        warn_once("generate returned no new tokens")
    mask = completion_mask(completion_ids, stop_ids)
    texts = tokenizer.batch_decode(completion_ids * mask + tokenizer.pad_token_id * (1 - mask),
                                   skip_special_tokens=True)
    return Rollout(enc["input_ids"].repeat_interleave(count, dim=0), enc["attention_mask"].repeat_interleave(count, dim=0),
                   completion_ids, mask, texts, [v for v in vision for _ in range(count)])

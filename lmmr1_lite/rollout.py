"""Rollouts: G completions per prompt, from a decode loop of our own over the HF model and its KV cache.

Why a loop and not HF `generate` with a logits processor: three of the things a rollout needs are
outside what `generate` lets a processor change. `generate(num_return_sequences=G)` expands the batch
*before* the prefill, so every prompt (and its images, through the vision encoder) is prefilled G
times; it carries finished rows to the longest one, feeding them pad tokens; and it samples with
`torch.multinomial`, whose `exponential_` draw over Qwen's 151,936-token vocabulary costs more than
a small model's decode forward. The loop below is short and uses only the model's public pieces:

  * prefill: the backbone (`models.backbone`) once per prompt, with the same positions HF `generate`
    computes (`cumsum(mask) - 1`, and Qwen2.5-VL's 3-D multimodal rotary positions when
    `mm_token_type_ids` are given); then the `DynamicCache`, the attention mask and the last
    positions are repeated to the G rows of each group (`batch_repeat_interleave`). The positions of
    every later token are `last + 1` per row, so the rotary offsets of the image rows (HF keeps them
    as `rope_deltas`) travel with the expanded rows without touching the model's state.
  * decode: one token per row per step; logits only for the last position (`hidden @ lm_head.T`,
    fp32), never `[tokens, vocab]` for the prompt.
  * sampling (`next_tokens`): temperature, top-k and top-p as HF's warpers define them, vision
    placeholders suppressed, then an inverse-CDF draw with ONE uniform per row: sums of 1024-token
    blocks of the softmax (accumulated in fp64) pick a block, an fp64 cumulative sum inside that
    block picks the token, and the log of the drawn token's softmax entry is its log-prob. Its cost
    is about one softmax; a Gumbel-max draw needs V random numbers (and two logs) per row, which is
    what makes `multinomial` (its `exponential_` draw) slow; bench/sampling.py measures all three.
  * finished rows (a stop token, or a stop string that may span several tokens) leave the batch and
    the cache (`batch_select_indices`) at once; the output is padded back to a right-padded `[N, C]`.

Greedy decoding gives the same tokens as HF `generate(do_sample=False)` (tests/test_sampling.py).
Every row also records the log-prob of its tokens under the full temperature softmax, the quantity
the training pass computes (`Rollout.logprobs`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import models
from .models import warn_once


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

    def rows(self, index: slice) -> "Rollout":
        return Rollout(self.prompt_ids[index], self.prompt_mask[index], self.completion_ids[index],
                       self.completion_mask[index], self.texts[index], self.vision[index],
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
    ids = []
    for token in PLACEHOLDERS:  # not get_vocab(): that builds a 151k-entry dict (0.2 s) per call
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is not None and tokenizer.convert_ids_to_tokens(token_id) == token:
            ids.append(token_id)
    return ids


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------
SAMPLE_BLOCK = 1024  # tokens per block of the two-level inverse-CDF draw
# Bytes of one fp32 `[rows, vocab]` scratch block while sampling. On CPU a block under glibc's largest
# mmap threshold (32 MiB) is served from the heap again after the first step instead of fresh zeroed
# pages each time; 16 MiB is about 27 rows of Qwen's vocabulary.
SAMPLE_CHUNK_BYTES = {"cuda": 256 * 2**20, "cpu": 16 * 2**20}


def inverse_cdf_sample(weights: torch.Tensor, uniforms: torch.Tensor, block: int = SAMPLE_BLOCK):
    """One draw per row from unnormalised non-negative `weights [n, V]` (fp32), with `uniforms [n]`
    (fp64, in [0, 1)). Returns `(tokens [n] int64, total [n] fp64)`, total the row sum of the weights.

    Two levels, so nothing of size V is written: sums of `block`-token blocks (fp32, pairwise, then
    accumulated in fp64) choose the block the uniform falls in, an fp64 cumulative sum inside that
    block chooses the token. A token of weight 0 is never chosen (its cumulative sum equals its
    predecessor's, so a `right=True` search stops earlier); a row of all zeros returns total 0."""
    n, vocab = weights.shape
    block = max(1, min(block, vocab))
    full = vocab // block * block
    sums = [weights[:, :full].reshape(n, -1, block).sum(-1)] if full else []
    if full < vocab:
        sums.append(weights[:, full:].sum(-1, keepdim=True))
    block_cdf = torch.cumsum(torch.cat(sums, dim=1).double(), dim=1)  # [n, blocks]
    total = block_cdf[:, -1].contiguous()
    target = (uniforms.to(torch.float64) * total)[:, None]
    chosen = torch.searchsorted(block_cdf, target, right=True)
    # a product that rounded up to the total: take the last block with weight
    chosen = torch.minimum(chosen, torch.searchsorted(block_cdf, total[:, None], right=False))
    chosen = chosen.clamp_(max=block_cdf.shape[1] - 1)
    before = torch.where(chosen > 0, block_cdf.gather(1, (chosen - 1).clamp(min=0)), torch.zeros_like(target))
    cols = chosen * block + torch.arange(block, device=weights.device)  # [n, block]
    inside = weights.gather(1, cols.clamp(max=vocab - 1)).to(torch.float64).masked_fill_(cols >= vocab, 0.0)
    inside_cdf = torch.cumsum(inside, dim=1)
    # the block's fp64 cumulative sum can end a rounding error below its fp32 sum: then the last
    # token of the block with weight is taken
    offset = torch.searchsorted(inside_cdf, target - before, right=True)
    offset = torch.minimum(offset, torch.searchsorted(inside_cdf, inside_cdf[:, -1:].contiguous(), right=False))
    return (chosen * block + offset.clamp_(max=block - 1)).squeeze(1), total


def filter_top_k_top_p_(scores: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """HF's TopKLogitsWarper then TopPLogitsWarper on temperature-scaled `scores [n, V]`, in place:
    removed tokens become -inf. top-k keeps every token scoring at least the k-th score; top-p
    removes the lowest tokens whose cumulative probability stays at or below 1 - top_p (the most
    likely token always stays). Top-p looks at the 1024 most likely tokens first and sorts the whole
    row only when they hold less than top_p of the mass."""
    vocab = scores.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores.masked_fill_(scores < kth, float("-inf"))
    if top_p < 1.0:
        probs = torch.softmax(scores, dim=-1)
        head, head_idx = torch.topk(probs, min(1024, vocab), dim=-1)  # descending
        if bool((head.sum(-1) >= top_p).all()):
            # keep a token iff the mass ranked strictly above it is < top_p, i.e. its ascending
            # cumulative probability 1 - above is > 1 - top_p (HF's rule, from the other end)
            above = torch.cumsum(head, dim=-1) - head
            keep = above < top_p
            keep[:, 0] = True
            kept = torch.full_like(scores, float("-inf"))
            kept.scatter_(1, head_idx, torch.where(keep, scores.gather(1, head_idx), float("-inf")))
            scores.copy_(kept)
        else:
            sorted_scores, sorted_idx = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= (1 - top_p)
            remove[:, -1] = False
            scores.masked_fill_(remove.scatter(1, sorted_idx, remove), float("-inf"))
    return scores


def _next_tokens_chunk(logits, inv_t, greedy, top_k, top_p, suppress, uniforms, block):
    z = logits.float()
    scaled = z * inv_t if inv_t != 1.0 else z
    # the full temperature softmax (no suppression, no filtering): the training pass's distribution.
    # log(p) of a normal fp32 p is within ~2e-7 of log_softmax; p under 2^-126 is recomputed below.
    probs = torch.softmax(scaled, dim=-1)
    if greedy:
        tokens = (z.index_fill(1, suppress, float("-inf")) if suppress is not None else z).argmax(-1)
    else:
        filtering = (0 < top_k < scaled.shape[-1]) or top_p < 1.0
        if filtering:
            kept = scaled.clone() if suppress is None else scaled.index_fill(1, suppress, float("-inf"))
            weights = torch.softmax(filter_top_k_top_p_(kept, top_k, top_p), dim=-1)
        else:  # the full softmax with the suppressed tokens' weight removed: no second pass over V
            # in place: a suppressed token is never drawn, so `probs` stays right for the tokens drawn
            weights = probs if suppress is None else probs.index_fill_(1, suppress, 0.0)
        tokens, total = inverse_cdf_sample(weights, uniforms, block)
        empty = total <= 0  # every allowed token underflowed next to a suppressed one: renormalise
        if bool(empty.any()):
            masked = scaled[empty].index_fill(1, suppress, float("-inf"))
            tokens[empty], _ = inverse_cdf_sample(torch.softmax(masked, dim=-1), uniforms[empty], block)
    chosen = probs.gather(1, tokens[:, None]).squeeze(1)
    logp = torch.log(chosen)
    tiny = chosen < torch.finfo(torch.float32).tiny
    if bool(tiny.any()):
        logp[tiny] = (scaled[tiny].gather(1, tokens[tiny, None]).squeeze(1)
                      - torch.logsumexp(scaled[tiny], dim=-1))
    return tokens, logp


def next_tokens(logits: torch.Tensor, *, temperature: float = 1.0, greedy: bool = False, top_k: int = 0,
                top_p: float = 1.0, suppress: torch.Tensor | None = None, generator: torch.Generator | None = None,
                block: int = SAMPLE_BLOCK, chunk_rows: int | None = None):
    """The next token of each row of `logits [n, V]` and its log-prob: `(tokens [n], logp [n] fp32)`.

    Sampled from softmax(logits / temperature) after `suppress` (token ids never produced), top-k and
    top-p, exactly as HF's processors define them; greedy: the argmax of the suppressed logits, as HF
    greedy search. `logp` is log_softmax(logits / temperature)[token] over the full vocabulary (no
    suppression, no filtering), the training pass's definition. One fp64 uniform per row is drawn
    from `generator` (the global RNG by default); `logits` is not modified. Rows are processed in
    chunks of `chunk_rows` (default: SAMPLE_CHUNK_BYTES of fp32 scratch)."""
    n, vocab = logits.shape
    device = logits.device
    tokens = torch.empty(n, dtype=torch.long, device=device)
    logp = torch.empty(n, dtype=torch.float32, device=device)
    uniforms = None if greedy else torch.rand(n, dtype=torch.float64, device=device, generator=generator)
    if suppress is not None:
        suppress = torch.as_tensor(suppress, dtype=torch.long, device=device)
        suppress = suppress if suppress.numel() else None
    budget = SAMPLE_CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    rows = chunk_rows or max(1, budget // (4 * vocab))
    for start in range(0, n, rows):
        part = slice(start, min(n, start + rows))
        tokens[part], logp[part] = _next_tokens_chunk(
            logits[part], 1.0 / temperature, greedy, top_k, top_p, suppress,
            None if uniforms is None else uniforms[part], block)
    return tokens, logp


# ---------------------------------------------------------------------------------------------
# Stopping
# ---------------------------------------------------------------------------------------------
class StopStrings:
    """Stop strings that may span several tokens (`</answer>` is `</`, `answer`, `>` for Qwen).

    A row stops at the token that completes a stop string; that token may run past the string's end
    (`>\\n` completes `</answer>`), as HF's StopStringCriteria allows. Checked after every token, so
    only the last `len(utf-8 bytes) + 1` tokens need decoding, and only for rows whose last token
    can end a stop string (its text holds the string's last character, or a partial UTF-8 byte)."""

    def __init__(self, tokenizer, strings):
        self.tokenizer = tokenizer
        self.strings = [s for s in strings if s]
        self.window = max((len(s.encode("utf-8")) for s in self.strings), default=0) + 1
        self.last_chars = {s[-1] for s in self.strings}
        self._text: dict[int, str] = {}

    def __bool__(self) -> bool:
        return bool(self.strings)

    def _token_text(self, token: int) -> str:
        if token not in self._text:
            self._text[token] = self.tokenizer.decode([token], skip_special_tokens=False,
                                                      clean_up_tokenization_spaces=False)
        return self._text[token]

    def __call__(self, history: torch.Tensor) -> torch.Tensor:
        """`history [n, t]` (the rows' generated tokens so far, CPU) -> bool `[n]`: ends a stop string."""
        done = torch.zeros(history.shape[0], dtype=torch.bool)
        tail = history[:, -self.window:].tolist()
        for row, tokens in enumerate(tail):
            last = self._token_text(tokens[-1])
            if "\ufffd" not in last and not any(c in last for c in self.last_chars):
                continue
            text = self.tokenizer.decode(tokens, skip_special_tokens=False, clean_up_tokenization_spaces=False)
            done[row] = any(s in text for s in self.strings)
        return done


def split_stop_strings(tokenizer, stop_strings) -> tuple[list[int], list[str]]:
    """Stop strings that are one token of this tokenizer (-> ids) and those that are several."""
    ids, multi = [], []
    for text in stop_strings or ():
        encoded = tokenizer.encode(text, add_special_tokens=False)
        (ids.append(encoded[0]) if len(encoded) == 1 else multi.append(text))
    return ids, multi


# ---------------------------------------------------------------------------------------------
# The decode loop
# ---------------------------------------------------------------------------------------------
def _output_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class StaticDecodeStep:
    """The decode step over a preallocated `StaticCache`: the same shapes every step (`[rows, 1]` tokens,
    a `[rows, prompt + max_new_tokens]` mask), so `torch.compile` can trace it once and, on CUDA with
    `mode="reduce-overhead"`, replay it as a CUDA graph: a step of a small model on a GPU is bound by
    kernel launches, not arithmetic. The price: finished rows stay in the batch (their tokens are
    masked afterwards), where the dynamic cache lets them leave. The cache length is rounded up to a
    multiple of `LENGTH_QUANTUM`, and one instance (its cache, mask buffer and compiled step) is kept
    per (rows, length), so a run whose steps have the same batch shape compiles once."""

    LENGTH_QUANTUM = 128
    _instances: dict = {}

    def __init__(self, policy, rows: int, max_len: int, compiled: bool):
        from transformers import StaticCache

        self.body = models.backbone(policy)
        self.cache_kw = models.cache_keyword(self.body)
        self.cache = StaticCache(config=models.unwrap(policy).config, max_cache_len=max_len)
        self.mask = None
        self.length = 0
        cuda = policy.device.type == "cuda"
        self.forward = (torch.compile(self._forward, mode="reduce-overhead" if cuda else "default", dynamic=False)
                        if compiled else self._forward)

    @classmethod
    def for_batch(cls, policy, prefilled, attention_mask: torch.Tensor, max_new_tokens: int, compiled: bool):
        """The step for this batch, its cache holding the prefilled (and row-expanded) `prefilled` cache."""
        rows, prompt_len = attention_mask.shape
        max_len = -(-(prompt_len + max_new_tokens) // cls.LENGTH_QUANTUM) * cls.LENGTH_QUANTUM
        # keyed by the backbone, which each instance holds: its id cannot be reused while the entry exists
        key = (id(models.backbone(policy)), rows, max_len, compiled)
        if key not in cls._instances:
            cls._instances = {k: v for k, v in cls._instances.items() if k[0] == key[0]}  # another model's: dropped
            cls._instances[key] = cls(policy, rows, max_len, compiled)
        step = cls._instances[key]
        step.load(prefilled, attention_mask)
        return step

    def load(self, prefilled, attention_mask: torch.Tensor) -> None:
        prompt_len = attention_mask.shape[1]
        for layer, source in zip(self.cache.layers, prefilled.layers):
            if not layer.is_initialized:
                layer.lazy_initialization(source.keys, source.values)
            layer.keys.zero_()
            layer.values.zero_()
            layer.keys[:, :, :prompt_len].copy_(source.keys)
            layer.values[:, :, :prompt_len].copy_(source.values)
            layer.cumulative_length.fill_(prompt_len)
        if self.mask is None:
            self.mask = attention_mask.new_zeros(attention_mask.shape[0], self.cache.layers[0].max_cache_len)
        self.mask.zero_()
        self.mask[:, :prompt_len] = attention_mask
        self.length = prompt_len

    def _forward(self, input_ids, attention_mask, position_ids):
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=True, **{self.cache_kw: self.cache})
        return out.last_hidden_state[:, -1]

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Hidden state `[rows, H]` after feeding one token per row at `position_ids [4, rows, 1]`."""
        self.mask[:, self.length] = 1
        self.length += 1
        return self.forward(input_ids, self.mask, position_ids).clone()  # a CUDA graph reuses its output


@torch.no_grad()
def decode(policy, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision: dict | None = None, *,
           count: int, max_new_tokens: int, temperature: float, stop_ids, pad_id: int, greedy: bool = False,
           top_k: int = 0, top_p: float = 1.0, suppress=None, stop_strings: StopStrings | None = None,
           mm_token_type_ids: torch.Tensor | None = None, generator: torch.Generator | None = None,
           cache_mode: str = "dynamic"):
    """Generate `count` continuations of each left-padded prompt row (row i*count + j: prompt i).

    Returns `(tokens [N, C], lengths [N], logprobs [N, C])`: tokens right-padded with `pad_id` after
    each row's end, `lengths` the tokens up to and including the stop (C if none), `logprobs` of
    the kept tokens (0 after the end); C is the longest row's length, at most `max_new_tokens`.
    `cache_mode` (see `StaticDecodeStep`): 'dynamic' (finished rows leave the batch and the cache),
    'static' or 'compiled' (a preallocated cache and fixed shapes; finished rows stay, masked)."""
    body, weight = models.backbone(policy), models.lm_head_weight(policy)
    bias = getattr(models.unwrap(policy).get_output_embeddings(), "bias", None)
    device = input_ids.device
    cache_kw = models.cache_keyword(body)
    rows = input_ids.shape[0] * count
    tokens = torch.full((rows, max(max_new_tokens, 0)), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(tokens.shape, dtype=torch.float32, device=device)
    lengths = torch.full((rows,), max(max_new_tokens, 0), dtype=torch.long, device=device)
    if max_new_tokens <= 0:
        return tokens, lengths, logprobs
    stop_tensor = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    suppress = torch.as_tensor(suppress if suppress is not None else [], dtype=torch.long, device=device)

    positions = models.prefill_positions(policy, input_ids, attention_mask, vision or {}, mm_token_type_ids)
    out = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
               **(vision or {}))
    cache, hidden = _output_cache(out), out.last_hidden_state[:, -1]
    last_position = positions[..., -1:]  # [4, B, 1]
    if count > 1:  # one prefill per prompt; its cache serves the prompt's `count` rows
        cache.batch_repeat_interleave(count)
        hidden = hidden.repeat_interleave(count, dim=0)
        attention_mask = attention_mask.repeat_interleave(count, dim=0)
        last_position = last_position.repeat_interleave(count, dim=1)
    active = torch.arange(rows, device=device)  # the output row of each row of the batch
    static = None if cache_mode == "dynamic" else StaticDecodeStep.for_batch(
        policy, cache, attention_mask, max_new_tokens, compiled=cache_mode == "compiled")
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    steps = 0
    for step in range(max_new_tokens):
        logits = torch.nn.functional.linear(hidden, weight, bias)
        chosen, logp = next_tokens(logits, temperature=temperature, greedy=greedy, top_k=top_k, top_p=top_p,
                                   suppress=suppress, generator=generator)
        del logits
        tokens[active, step] = chosen
        logprobs[active, step] = logp
        steps = step + 1
        finished = torch.isin(chosen, stop_tensor)
        if stop_strings:
            finished |= stop_strings(tokens[active, : step + 1].cpu()).to(device)
        if static is not None:  # every row stays; a row's first stop sets its length
            lengths[finished & ~done] = step + 1
            done |= finished
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            last_position = last_position + 1
            hidden = static(chosen[:, None], last_position)
            continue
        if bool(finished.any()):
            lengths[active[finished]] = step + 1
            keep = (~finished).nonzero().squeeze(1)
            if keep.numel() == 0:
                break
            cache.batch_select_indices(keep)  # finished rows leave the batch and the cache
            active, chosen = active[keep], chosen[keep]
            attention_mask, last_position = attention_mask[keep], last_position[:, keep]
        if step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(attention_mask.shape[0], 1)], dim=1)
        last_position = last_position + 1
        out = body(input_ids=chosen[:, None], attention_mask=attention_mask, position_ids=last_position,
                   use_cache=True, **{cache_kw: cache})
        cache, hidden = _output_cache(out), out.last_hidden_state[:, -1]
    lengths.clamp_(max=steps)
    keep_mask = torch.arange(steps, device=device)[None, :] < lengths[:, None]
    return (tokens[:, :steps].masked_fill(~keep_mask, pad_id), lengths,
            logprobs[:, :steps].masked_fill(~keep_mask, 0.0))


@torch.no_grad()
def generate(policy, tokenizer, messages: list[list[dict]], *, num_generations: int, max_new_tokens: int,
             temperature: float, stop_ids: list[int], greedy: bool = False, image_processor=None,
             top_k: int = 0, top_p: float = 1.0, stop_strings: list[str] | tuple = (),
             generator: torch.Generator | None = None, cache_mode: str = "dynamic") -> Rollout:
    """Sample `num_generations` completions for each prompt (greedy: one, argmax).

    Each prompt is prefilled once (images through the vision encoder once) and its KV cache shared
    by its G rows; rows leave the batch when they stop. A row stops at any of `stop_ids` or at the
    end of any of `stop_strings` (several tokens allowed; single-token ones act as stop ids); its
    mask covers the stop. `top_k` (0: off) and `top_p` (1.0: off) filter as HF's warpers do."""
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
            cache_mode=cache_mode)
    finally:
        policy.train(was_training)
    if completion_ids.shape[1] == 0:
        warn_once("generate returned no new tokens")
    mask = (torch.arange(completion_ids.shape[1], device=lengths.device)[None, :] < lengths[:, None]).long()
    texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
    clipped = lengths >= max_new_tokens  # at the cap: clipped unless its last token ended it
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

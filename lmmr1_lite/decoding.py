"""The rollouts' decode loop (`decode`) over the HF model and its KV cache, and its stop strings.

  * prefill: the backbone (`models.backbone`) once per prompt, with the same positions HF `generate`
    computes (`cumsum(mask) - 1`, and Qwen2.5-VL's 3-D multimodal rotary positions when
    `mm_token_type_ids` are given); then each prompt's keys and values are copied into its G rows of
    the decode cache, and the attention mask and the last positions are repeated to those rows. The
    dynamic cache keeps HF's `DynamicCache` with its layers replaced by `InPlaceKVLayer`s (buffers
    written in place, grown geometrically: HF's `DynamicLayer` concatenates, so every step allocated
    and copied the whole cache of every layer); the static and compiled caches copy into their own
    preallocated cache. A cache that is not a `DynamicCache` of plain `DynamicLayer`s (another model
    family) keeps HF's layers, repeated with `batch_repeat_interleave`.
    The positions of every later token are `last + 1` per row, so the rotary offsets of the image rows (HF keeps them
    as `rope_deltas`) travel with the expanded rows without touching the model's state.
  * decode: one token per row per step; logits only for the last position (`hidden @ lm_head.T`,
    fp32), never `[tokens, vocab]` for the prompt; the token drawn by `sampling.next_tokens`.
  * finished rows (a stop token, or a stop string that may span several tokens: `StopStrings`) leave
    the batch and the cache (`batch_select_indices`; `InPlaceKVLayer` moves the kept rows to the front
    of its buffers) at once; the output is padded back to a
    right-padded `[N, C]`. With `cache_mode` 'static' or 'compiled' (`StaticDecodeStep`) they stay.
"""
from __future__ import annotations

import time

import torch
from transformers.cache_utils import DynamicLayer

from . import models
from .sampling import next_tokens


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


def grown_capacity(capacity: int, needed: int, limit: int) -> int:
    """The tokens an `InPlaceKVLayer` of `capacity` reallocates to when `needed` do not fit: twice as many, at most
    `limit` (0: none), and never fewer than needed."""
    grown = max(needed, 2 * capacity)
    return max(needed, min(limit, grown)) if limit else grown


class InPlaceKVLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in `[rows, kv_heads, capacity, head_dim]` buffers written in
    place: `update` copies the new tokens to `[:, :, length:length + n]` and returns views of the first `length`
    tokens (also kept as `keys`/`values`, which HF's `get_seq_length` and `get_mask_sizes` read). HF's own layer
    concatenates at every step, so each step of each layer allocated a tensor one token longer than the last
    and copied the whole cache into it: O(L^2) bytes copied over a generation, and on CUDA a caching allocator
    that cannot reuse the freed, smaller blocks (the 3B's 64 x 640-token generation on the H200: 5.83 GiB
    allocated, 23.34 GiB reserved).

    A write past the capacity reallocates to `min(limit, max(needed, 2 x capacity))`: with `limit` the prompt
    plus `max_new_tokens`, a generation reallocates at most `ceil(log2(limit / initial capacity))` times, and
    the capacities a layer ever allocates sum to under three times its last (twice where the last is a full
    doubling), so the caching allocator's reserve stays bounded. Finished rows leave by moving the kept rows to the
    front of the same buffers (`batch_select_indices`); a buffer keeps its rows' memory until it is outgrown,
    when the new one is sized for the rows still running."""

    def __init__(self, limit: int = 0):
        super().__init__()
        self.limit = limit  # doubling stops at this many tokens (a longer write still fits); 0: no limit
        self.length = 0  # tokens held
        self.rows = 0  # rows held, at the front of the buffers
        self.buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.allocations = 0  # buffers (pairs) allocated, the first included

    @classmethod
    def from_layer(cls, layer, count: int, capacity: int, limit: int) -> "InPlaceKVLayer":
        """A layer holding `layer`'s keys and values (`[prompts, heads, length, dim]`), each prompt's repeated to
        `count` consecutive rows, in buffers of `capacity` tokens (at least `layer`'s length)."""
        keys, values = layer.keys, layer.values
        made = cls(limit)
        made.lazy_initialization(keys, values)
        prompts, _, length, _ = keys.shape
        made._allocate(prompts * count, max(capacity, length), like=(keys, values))
        for buffer, source in zip(made.buffers, (keys, values)):  # a broadcast copy: no repeated tensor first
            buffer.view(prompts, count, *buffer.shape[1:])[:, :, :, :length].copy_(source[:, None])
        made.rows, made.length = prompts * count, length
        made._set_views()
        return made

    @property
    def capacity(self) -> int:
        return 0 if self.buffers is None else self.buffers[0].shape[2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # what transformers 5.17 sets (5.25 sets no `dtype`); the buffers come with the first write
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def _allocate(self, rows: int, capacity: int, like: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        like = like or (self.keys, self.values)
        buffers = tuple(t.new_empty(rows, t.shape[1], capacity, t.shape[3]) for t in like)
        if self.buffers is not None and self.length:  # the tokens held, for the rows kept
            keep = min(rows, self.rows)
            for new, old in zip(buffers, self.buffers):
                new[:keep, :, :self.length].copy_(old[:keep, :, :self.length])
        self.buffers = buffers
        self.allocations += 1

    def _set_views(self) -> None:
        self.keys, self.values = (b[:self.rows, :, :self.length] for b in self.buffers)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.buffers is None:
            self.rows = key_states.shape[0]
        elif key_states.shape[0] != self.rows:
            raise ValueError(f"{key_states.shape[0]} rows written to a cache of {self.rows}")
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            self._allocate(self.rows, grown_capacity(self.capacity, end, self.limit), like=(key_states, value_states))
        for buffer, states in zip(self.buffers, (key_states, value_states)):
            buffer[:self.rows, :, self.length:end].copy_(states)
        self.length = end
        self._set_views()
        return self.keys, self.values

    def _select(self, indices: torch.Tensor) -> None:
        """Rows `indices` (any order, repeats allowed) become the first rows, in the same buffers while they fit."""
        rows = indices.shape[0]
        if rows > self.buffers[0].shape[0]:
            self._allocate(rows, self.capacity)  # keeps the first rows' tokens: the gather below reads them
        indices = indices.to(self.device)
        for buffer in self.buffers:
            live = buffer[:, :, :self.length]
            live[:rows].copy_(live[indices])  # the gather is a temporary of the live tokens, then freed
        self.rows = rows
        self._set_views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.buffers is not None:
            self._select(indices)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.buffers is not None:
            self._select(beam_idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.buffers is not None:
            self._select(torch.arange(self.rows, device=self.device).repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last `-tokens_to_remove` tokens (HF's convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative count of tokens to remove, got {tokens_to_remove}")
        if self.buffers is not None and tokens_to_remove:
            self.length = max(0, self.length + tokens_to_remove)
            self._set_views()

    def reset(self) -> None:  # as transformers 5.25's DynamicLayer (5.17's would zero the views and keep them)
        self.keys = self.values = self.buffers = None
        self.is_initialized = False
        self.length = self.rows = 0


FIRST_NEW_TOKENS = 128  # the room for new tokens an `in_place_cache` layer starts with (fewer if fewer are wanted)


def in_place_capacity(prompt_tokens: int, held: int, max_new_tokens: int) -> int:
    """The tokens each `InPlaceKVLayer` of `in_place_cache` has room for once it holds `held` (the prompt's and
    the decode steps' so far, written one at a time): the first capacity doubled as often as `held` outgrew it, at
    most the prompt + `max_new_tokens`. What a generation stopped early holds (up to twice its tokens)."""
    limit, capacity = prompt_tokens + max_new_tokens, prompt_tokens + min(max_new_tokens, FIRST_NEW_TOKENS)
    while held > capacity:  # as `InPlaceKVLayer.update` grows it when one token more does not fit
        capacity = grown_capacity(capacity, capacity + 1, limit)
    return capacity


def in_place_cache(cache, count: int, max_new_tokens: int) -> bool:
    """Replace the layers of a prefilled `DynamicCache` by `InPlaceKVLayer`s holding each prompt's keys and values
    in its `count` rows, sized for the prompt plus `min(max_new_tokens, FIRST_NEW_TOKENS)` tokens and grown up to
    the prompt plus `max_new_tokens` (`in_place_capacity`). False (the cache untouched) where the cache has no
    plain, filled `DynamicLayer`s, or offloads them to the CPU between layers (HF's `offloading`, which these
    buffers do not follow)."""
    layers = getattr(cache, "layers", None)
    if not layers or getattr(cache, "offloading", False):
        return False
    if any(type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys is None or layer.keys.dim() != 4
           for layer in layers):
        return False
    for i, layer in enumerate(layers):
        length = layer.keys.shape[2]
        layers[i] = InPlaceKVLayer.from_layer(layer, count, capacity=in_place_capacity(length, length, max_new_tokens),
                                              limit=length + max_new_tokens)
    return True


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
    def for_batch(cls, policy, prefilled, attention_mask: torch.Tensor, max_new_tokens: int, compiled: bool,
                  count: int = 1):
        """The step for this batch (`attention_mask`: one row per completion), its cache holding the prefilled cache
        of the prompts, each repeated to its `count` rows."""
        rows, prompt_len = attention_mask.shape
        max_len = -(-(prompt_len + max_new_tokens) // cls.LENGTH_QUANTUM) * cls.LENGTH_QUANTUM
        # keyed by the backbone, which each instance holds: its id cannot be reused while the entry exists
        key = (id(models.backbone(policy)), rows, max_len, compiled)
        if key not in cls._instances:
            cls._instances = {k: v for k, v in cls._instances.items() if k[0] == key[0]}  # another model's: dropped
            cls._instances[key] = cls(policy, rows, max_len, compiled)
        step = cls._instances[key]
        step.load(prefilled, attention_mask, count)
        return step

    def load(self, prefilled, attention_mask: torch.Tensor, count: int = 1) -> None:
        """Each prompt's keys and values copied into its `count` rows (a broadcast copy: the prompts' cache is
        never expanded to every row beside the static one)."""
        rows, prompt_len = attention_mask.shape
        for layer, source in zip(self.cache.layers, prefilled.layers):
            if not layer.is_initialized:  # shapes from a view with every row: no copy
                layer.lazy_initialization(*(t[:1].expand(rows, *t.shape[1:]) for t in (source.keys, source.values)))
            layer.keys.zero_()
            layer.values.zero_()
            for mine, theirs in ((layer.keys, source.keys), (layer.values, source.values)):
                mine.view(-1, count, *mine.shape[1:])[:, :, :, :prompt_len].copy_(theirs[:, None])
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


def static_step_explainer(policy, rows: int = 2, prompt_tokens: int = 6, lora_autocast: bool = False):
    """A function that returns `torch._dynamo.explain` of one static-cache decode step of `policy`, what
    decode_cache 'compiled' compiles (its CUDA graphs need the step traced whole: one graph, no graph break),
    over `rows` prompts of `prompt_tokens` fixed token ids, prefilled now, traced under `models.lora_autocast`
    as `decode` runs it. It traces whatever modules the policy has when called (inside
    `rollout.adapter_merged`: the merged copies)."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 30, (rows, prompt_tokens), generator=generator).to(policy.device)
    mask = torch.ones_like(ids)
    positions = models.prefill_positions(policy, ids, mask, {}, None)
    with torch.no_grad():
        out = models.backbone(policy)(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        step = StaticDecodeStep(policy, rows, StaticDecodeStep.LENGTH_QUANTUM, compiled=False)
        step.load(_output_cache(out), mask)
        step.mask[:, step.length] = 1

    def explain():
        with torch.no_grad(), models.lora_autocast(policy, lora_autocast):
            return torch._dynamo.explain(step._forward)(ids[:, :1], step.mask, positions[..., -1:] + 1)
    return explain


def explanation_summary(explanation, reasons: int = 5) -> dict:
    """What `torch._dynamo.explain` found, as JSON: graphs, graph breaks and the first breaks' reasons."""
    return {"graphs": explanation.graph_count, "graph_breaks": explanation.graph_break_count,
            "ops": explanation.op_count,
            "break_reasons": [str(b.reason).splitlines()[0][:200] for b in explanation.break_reasons[:reasons]]}


@torch.no_grad()
def decode(policy, input_ids: torch.Tensor, attention_mask: torch.Tensor, vision: dict | None = None, *,
           count: int, max_new_tokens: int, temperature: float, stop_ids, pad_id: int, greedy: bool = False,
           top_k: int = 0, top_p: float = 1.0, suppress=None, stop_strings: StopStrings | None = None,
           mm_token_type_ids: torch.Tensor | None = None, generator: torch.Generator | None = None,
           cache_mode: str = "dynamic", lora_autocast: bool = False, deadline: float | None = None):
    """Generate `count` continuations of each left-padded prompt row (row i*count + j: prompt i).

    Returns `(tokens [N, C], lengths [N], logprobs [N, C])`: tokens right-padded with `pad_id` after
    each row's end, `lengths` the tokens up to and including the stop (C if none), `logprobs` of
    the kept tokens (0 after the end); C is the longest row's length, at most `max_new_tokens`.
    `cache_mode` (see `StaticDecodeStep`): 'dynamic' (finished rows leave the batch and the cache),
    'static' or 'compiled' (a preallocated cache and fixed shapes; finished rows stay, masked).
    `lora_autocast`: the model's forwards run inside ONE `models.lora_autocast` context for the whole
    generation, the training pass's LoRA numerics: autocast casts each fp32 LoRA weight to bf16 once and
    keeps it (its cast cache lives until the outermost context exits), where peft would cast every layer's
    input to fp32 and its output back at every token (bench/RESULTS.md, "the rollouts' LoRA side path").
    `deadline` (a `time.monotonic()` value; HF generate's `max_time` as a point in time): no step starts after
    it, so every row still running is cut at the same length (a benchmark's time budget)."""
    with models.lora_autocast(policy, lora_autocast):
        return _decode(policy, input_ids, attention_mask, vision, count=count, max_new_tokens=max_new_tokens,
                       temperature=temperature, stop_ids=stop_ids, pad_id=pad_id, greedy=greedy, top_k=top_k,
                       top_p=top_p, suppress=suppress, stop_strings=stop_strings,
                       mm_token_type_ids=mm_token_type_ids, generator=generator, cache_mode=cache_mode,
                       deadline=deadline)


def _decode(policy, input_ids, attention_mask, vision, *, count, max_new_tokens, temperature, stop_ids, pad_id,
            greedy, top_k, top_p, suppress, stop_strings, mm_token_type_ids, generator, cache_mode, deadline):
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
        hidden = hidden.repeat_interleave(count, dim=0)
        attention_mask = attention_mask.repeat_interleave(count, dim=0)
        last_position = last_position.repeat_interleave(count, dim=1)
    active = torch.arange(rows, device=device)  # the output row of each row of the batch
    static = None
    if cache_mode == "dynamic":
        # HF's layers concatenate at every step; ours write into buffers (each prompt's G rows copied at once)
        if not in_place_cache(cache, count, max_new_tokens) and count > 1:
            cache.batch_repeat_interleave(count)
    else:  # the prompts' cache copied into each of their rows of the static one, then freed
        static = StaticDecodeStep.for_batch(policy, cache, attention_mask, max_new_tokens,
                                            compiled=cache_mode == "compiled", count=count)
        out = cache = None
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    steps = 0
    for step in range(max_new_tokens):
        with torch.autocast(device.type, enabled=False):  # the sampler's fp32 stays fp32 under lora_autocast
            logits = torch.nn.functional.linear(hidden, weight, bias)
            chosen, logp = next_tokens(logits, temperature=temperature, greedy=greedy, top_k=top_k, top_p=top_p,
                                       suppress=suppress, generator=generator)
            del logits
        tokens[active, step] = chosen
        logprobs[active, step] = logp
        steps = step + 1
        finished = torch.isin(chosen, stop_tensor)
        if stop_strings:
            # only the last `window` tokens can complete a stop string: the rest of the history stays on the device
            finished |= stop_strings(tokens[active, max(0, step + 1 - stop_strings.window): step + 1].cpu()).to(device)
        last_step = step == max_new_tokens - 1 or (deadline is not None and time.monotonic() > deadline)
        if static is not None:  # every row stays; a row's first stop sets its length
            lengths[finished & ~done] = step + 1
            done |= finished
            if bool(done.all()) or last_step:
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
        if last_step:
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

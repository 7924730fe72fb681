"""Generation: KV cache on, stops at EOS / stop tokens, masks after the stop."""
import pytest
import torch

from lmmr1_lite import models
from lmmr1_lite.rollout import completion_mask, generate, stop_token_ids

PROMPTS = [[{"role": "user", "content": "max(3,7)"}], [{"role": "user", "content": "max(1,4)"}]]


def test_completion_mask_includes_first_stop_and_nothing_after():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 9, 9, 9, 9], [2, 5, 5, 5, 5], [5, 11, 6, 6, 6]])
    mask = completion_mask(ids, [2, 11])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]


def test_stop_token_ids_single_tokens_only(tiny_policy):
    _, tokenizer, _ = tiny_policy
    ids = stop_token_ids(tokenizer, ["</answer>", "not one token"])
    assert ids == sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("</answer>")})


def test_generate_uses_kv_cache(tiny_policy):
    """After one prefill, every decoding step feeds the backbone a single new token."""
    policy, tokenizer, cfg = tiny_policy
    lengths = []
    hook = models.backbone(policy).register_forward_pre_hook(
        lambda mod, args, kwargs: lengths.append(kwargs["input_ids"].shape[1] if kwargs.get("input_ids") is not None
                                                 else kwargs["inputs_embeds"].shape[1]), with_kwargs=True)
    try:
        batch = generate(policy, tokenizer, PROMPTS, num_generations=3, max_new_tokens=6, temperature=1.0,
                         stop_ids=[-1])  # no stop: all 6 tokens are generated
    finally:
        hook.remove()
    prompt_len = batch.prompt_ids.shape[1]
    assert batch.completion_ids.shape == (6, 6)
    assert lengths[0] == prompt_len and lengths[1:] == [1] * 5, lengths


def test_generate_stops_and_masks_after_stop(tiny_policy):
    policy, tokenizer, cfg = tiny_policy
    torch.manual_seed(0)
    stops = stop_token_ids(tokenizer, ["</answer>"])
    batch = generate(policy, tokenizer, PROMPTS * 8, num_generations=4, max_new_tokens=30, temperature=1.0,
                     stop_ids=stops)
    stop_set = torch.tensor(stops)
    finished = 0
    for ids, mask, text in zip(batch.completion_ids, batch.completion_mask, batch.texts):
        where = torch.isin(ids, stop_set).nonzero()
        if len(where):
            finished += 1
            first = where[0].item()
            assert mask[: first + 1].all() and not mask[first + 1:].any()
            assert (ids[first + 1:] == tokenizer.pad_token_id).all(), "generation continued past a stop token"
        else:
            assert mask.all()
        assert "<|im_end|>" not in text and "<|endoftext|>" not in text
    assert finished > 0, "some random completions must hit a stop token within 30 tokens"
    assert batch.prompt_ids.shape[0] == 64 and torch.equal(batch.prompt_ids[0], batch.prompt_ids[3])


# --- the decode loop against HF generate ------------------------------------------------------
def mixed_prompts(tokenizer):
    """Image prompts (one with two images, different grids) and text prompts of different lengths."""
    from lmmr1_lite.data import build_messages
    from lmmr1_lite.tasks import generate as draw

    images, _ = draw("tiny_color", 2, 0, seed=0)
    text_only, _ = draw("tiny_compare", 2, 0, seed=0)
    images[1].images[0] = images[1].images[0].resize((84, 56))
    images[0].images.append(images[1].images[0].resize((56, 112)))
    return ([build_messages(e) for e in (images[0], text_only[0], images[1], text_only[1])]
            + [[{"role": "user", "content": "max(3,7) " * 9}]])


def test_greedy_tokens_identical_to_hf_generate(tiny_policy):
    from lmmr1_lite.rollout import generate_hf

    policy, tokenizer, cfg = tiny_policy
    processor = models.load_image_processor(cfg.model, 56 * 56, 112 * 112)
    messages = mixed_prompts(tokenizer) + PROMPTS
    kwargs = dict(num_generations=4, max_new_tokens=32, temperature=0.7, greedy=True, image_processor=processor)
    # a random model's greedy rows rarely stop: make two tokens it does produce stop tokens
    free = generate_hf(policy, tokenizer, messages, stop_ids=[tokenizer.eos_token_id], **kwargs).completion_ids
    kwargs["stop_ids"] = [tokenizer.eos_token_id, int(free[0, 6]), int(free[2, 15])]
    ours, theirs = generate(policy, tokenizer, messages, **kwargs), generate_hf(policy, tokenizer, messages, **kwargs)
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    assert torch.equal(ours.completion_mask, theirs.completion_mask)
    assert ours.texts == theirs.texts and torch.equal(ours.prompt_ids, theirs.prompt_ids)
    assert 0 < int(theirs.completion_mask.sum(1).min()) < 32, "some rows stop early"


def test_one_prefill_per_prompt_expanded_rows_match_hf(tiny_policy):
    """G rows from one prefill (and one vision-encoder pass per image) give HF's tokens for the prompt
    repeated G times, and HF's log-probs; also with Qwen2.5-VL's 3-D rotary positions for the images."""
    from lmmr1_lite.models import multimodal_token_types, stack_vision
    from lmmr1_lite.rollout import decode, encode_prompts, placeholder_ids

    policy, tokenizer, cfg = tiny_policy
    policy.eval()
    model = models.unwrap(policy)
    processor = models.load_image_processor(cfg.model, 56 * 56, 112 * 112)
    messages = mixed_prompts(tokenizer)
    stops = stop_token_ids(tokenizer, ["</answer>"])
    enc, vision = encode_prompts(tokenizer, messages, policy.device, processor)
    repeated, repeated_vision = encode_prompts(tokenizer, [m for m in messages for _ in range(3)], policy.device,
                                               processor)
    patches, by_mode = [], {}
    hook = model.model.visual.register_forward_pre_hook(lambda mod, args: patches.append(args[0].shape[0]))
    try:
        for mrope in (False, True):
            types = multimodal_token_types(enc["input_ids"], model.config) if mrope else None
            patches.clear()
            ids, lengths, logp = decode(policy, enc["input_ids"], enc["attention_mask"], stack_vision(vision), count=3,
                                        max_new_tokens=25, temperature=1.0, stop_ids=stops,
                                        pad_id=tokenizer.pad_token_id, greedy=True,
                                        suppress=placeholder_ids(tokenizer), mm_token_type_ids=types)
            assert patches == [sum(v["pixel_values"].shape[0] for v in vision if v is not None)], \
                "each image goes through the vision encoder once, not once per completion"
            kwargs = dict(repeated, **stack_vision(repeated_vision))
            if mrope:
                kwargs["mm_token_type_ids"] = multimodal_token_types(repeated["input_ids"], model.config)
            out = policy.generate(**kwargs, do_sample=False, max_new_tokens=25, eos_token_id=stops,
                                  pad_token_id=tokenizer.pad_token_id, suppress_tokens=placeholder_ids(tokenizer),
                                  return_dict_in_generate=True, output_logits=True)
            prompt_len = repeated["input_ids"].shape[1]
            assert torch.equal(ids, out.sequences[:, prompt_len:]), mrope
            hf_logp = torch.stack([torch.log_softmax(step.float(), -1) for step in out.logits], 1)
            hf_logp = hf_logp.gather(2, ids[..., None]).squeeze(2)
            mask = torch.arange(ids.shape[1])[None] < lengths[:, None]
            assert (logp - hf_logp).masked_fill(~mask, 0).abs().max() < 1e-5
            by_mode[mrope] = logp
        image_rows = torch.tensor([v is not None for v in vision]).repeat_interleave(3)
        assert not torch.allclose(by_mode[False][image_rows, 0], by_mode[True][image_rows, 0]), \
            "3-D positions change the image rows (else this test would not test them)"
        assert torch.equal(by_mode[False][~image_rows], by_mode[True][~image_rows])
    finally:
        hook.remove()
        policy.train()


def test_sampled_logprobs_equal_the_training_pass(tiny_policy):
    from lmmr1_kernels import token_logprobs

    policy, tokenizer, cfg = tiny_policy
    processor = models.load_image_processor(cfg.model, 56 * 56, 112 * 112)
    torch.manual_seed(0)
    batch = generate(policy, tokenizer, mixed_prompts(tokenizer), num_generations=4, max_new_tokens=30,
                     temperature=0.8, stop_ids=stop_token_ids(tokenizer, ["</answer>"]), image_processor=processor)
    assert batch.logprobs.shape == batch.completion_ids.shape
    policy.eval()
    with torch.no_grad():
        train_pass = token_logprobs(models.completion_hidden(policy, batch), models.lm_head_weight(policy),
                                    batch.completion_ids, 0.8)
    policy.train()
    mask = batch.completion_mask.bool()
    assert (batch.logprobs[~mask] == 0).all()
    assert (batch.logprobs - train_pass)[mask].abs().max() < 1e-5
    for part in (batch.rows(slice(3, 9)), type(batch).concat([batch.rows(slice(0, 2)), batch.rows(slice(2, 20))],
                                                            tokenizer.pad_token_id)):
        assert part.logprobs.shape == part.completion_ids.shape


def test_finished_rows_leave_the_decode_batch(tiny_policy):
    policy, tokenizer, cfg = tiny_policy
    sizes = []
    hook = models.backbone(policy).register_forward_pre_hook(
        lambda mod, args, kwargs: sizes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    stops = stop_token_ids(tokenizer, ["</answer>"])
    torch.manual_seed(0)
    try:
        batch = generate(policy, tokenizer, PROMPTS * 4, num_generations=4, max_new_tokens=30, temperature=1.0,
                         stop_ids=stops)
    finally:
        hook.remove()
    lengths = batch.completion_mask.sum(1)
    assert sizes[0] == 8, "the prefill runs once per prompt"
    # decode step s (1-based) feeds the rows still running after s tokens
    assert sizes[1:] == [int((lengths > s).sum()) for s in range(1, len(sizes))]
    assert sizes[-1] < 32 and lengths.min() < lengths.max()
    assert torch.equal(batch.completion_mask, completion_mask(batch.completion_ids, stops))
    assert batch.completion_ids.shape[1] == int(lengths.max())


def test_clipped_rows_are_those_that_hit_the_cap_without_a_stop(tiny_policy):
    """`Rollout.clipped` (TRL's completions/clipped_ratio): at max_new_tokens and not ended by a stop; a row
    whose last allowed token is a stop token is not clipped."""
    policy, tokenizer, cfg = tiny_policy
    first = generate(policy, tokenizer, PROMPTS, num_generations=1, max_new_tokens=1, temperature=1.0,
                     stop_ids=[tokenizer.eos_token_id], greedy=True)
    tokens = first.completion_ids[:, 0].tolist()
    assert first.clipped.tolist() == [t != tokenizer.eos_token_id for t in tokens]
    again = generate(policy, tokenizer, PROMPTS, num_generations=1, max_new_tokens=1, temperature=1.0,
                     stop_ids=[tokenizer.eos_token_id, tokens[0]], greedy=True)
    assert not bool(again.clipped[0]), "its one token is a stop: it ended, it was not cut"
    both = type(first).concat([first, again], tokenizer.pad_token_id)
    assert both.clipped.shape == (4,) and both.rows(slice(2, 4)).clipped.tolist() == again.clipped.tolist()


def test_static_cache_decode_gives_the_dynamic_tokens(tiny_policy):
    """decode_cache 'static': a preallocated cache, fixed shapes, finished rows kept in the batch. Greedy tokens
    equal the dynamic cache's (whose rows leave), for text and image prompts; sampled rows keep the training
    pass's log-probs and their masks end at the stop; a second call reuses the same cache object."""
    from lmmr1_kernels import token_logprobs
    from lmmr1_lite.rollout import StaticDecodeStep

    policy, tokenizer, cfg = tiny_policy
    StaticDecodeStep._instances.clear()
    processor = models.load_image_processor(cfg.model, 56 * 56, 112 * 112)
    messages = mixed_prompts(tokenizer)
    kwargs = dict(num_generations=1, max_new_tokens=25, temperature=1.0, greedy=True, image_processor=processor)
    unstopped = generate(policy, tokenizer, messages, stop_ids=[-1], **kwargs).completion_ids
    kwargs["stop_ids"] = [int(unstopped[0, 4])]  # a token the greedy rows reach at different steps (or never)
    dynamic = generate(policy, tokenizer, messages, **kwargs)
    static = generate(policy, tokenizer, messages, cache_mode="static", **kwargs)
    assert dynamic.completion_mask.sum(1).unique().numel() > 1, "rows of different lengths"
    assert torch.equal(dynamic.completion_ids, static.completion_ids)
    assert torch.equal(dynamic.completion_mask, static.completion_mask)
    assert len(StaticDecodeStep._instances) == 1
    cache = next(iter(StaticDecodeStep._instances.values())).cache
    # each prompt's cache copied into its G rows of the static one (a broadcast copy, never expanded first): with
    # no stop every row stays in the dynamic batch too, so the same seed draws the same tokens in both
    grouped = {}
    for mode in ("dynamic", "static"):
        torch.manual_seed(1)
        grouped[mode] = generate(policy, tokenizer, messages, num_generations=3, max_new_tokens=10, temperature=1.0,
                                 stop_ids=[-1], image_processor=processor, cache_mode=mode)
    assert grouped["static"].completion_ids.shape == (3 * len(messages), 10)
    assert torch.equal(grouped["dynamic"].completion_ids, grouped["static"].completion_ids)
    assert (grouped["dynamic"].logprobs - grouped["static"].logprobs).abs().max() < 1e-5
    StaticDecodeStep._instances = {k: v for k, v in StaticDecodeStep._instances.items() if v.cache is cache}
    torch.manual_seed(0)
    stops = stop_token_ids(tokenizer, ["</answer>"])
    sampled = generate(policy, tokenizer, messages * 2, num_generations=3, max_new_tokens=25, temperature=1.0,
                       stop_ids=stops, image_processor=processor, cache_mode="static")
    lengths = sampled.completion_mask.sum(1)
    assert lengths.unique().numel() > 1
    for ids, length in zip(sampled.completion_ids, lengths):
        assert (ids[length:] == tokenizer.pad_token_id).all()
        assert length == 25 or int(ids[length - 1]) in stops
    policy.eval()
    with torch.no_grad():
        train_pass = token_logprobs(models.completion_hidden(policy, sampled), models.lm_head_weight(policy),
                                    sampled.completion_ids)
    mask = sampled.completion_mask.bool()
    assert (sampled.logprobs - train_pass)[mask].abs().max() < 1e-5
    again = generate(policy, tokenizer, messages, cache_mode="static", **kwargs)
    assert torch.equal(again.completion_ids, dynamic.completion_ids)
    assert any(step.cache is cache for step in StaticDecodeStep._instances.values()), "the cache is reused"


@pytest.mark.slow
def test_compiled_decode_gives_the_dynamic_tokens(tiny_policy):
    """decode_cache 'compiled' (torch.compile of the static step; inductor on CPU, CUDA graphs on CUDA)."""
    policy, tokenizer, _ = tiny_policy
    stops = stop_token_ids(tokenizer, ["</answer>"])
    kwargs = dict(num_generations=1, max_new_tokens=12, temperature=1.0, stop_ids=stops, greedy=True)
    dynamic = generate(policy, tokenizer, PROMPTS * 3, **kwargs)
    compiled = generate(policy, tokenizer, PROMPTS * 3, cache_mode="compiled", **kwargs)
    assert torch.equal(dynamic.completion_ids, compiled.completion_ids)


@pytest.mark.slow
def test_compiled_decode_under_lora_autocast_gives_the_dynamic_tokens(build_tiny_policy):
    """The training step's rollouts on a bf16 model run under lora_autocast: the compiled step, traced inside that
    autocast context, gives the dynamic cache's greedy tokens there too."""
    policy, tokenizer, _ = build_tiny_policy(dtype="bfloat16", quantization="none", gradient_checkpointing=False)
    kwargs = dict(num_generations=2, max_new_tokens=12, temperature=1.0, stop_ids=[], greedy=True, lora_autocast=True)
    dynamic = generate(policy, tokenizer, PROMPTS, **kwargs)
    compiled = generate(policy, tokenizer, PROMPTS, cache_mode="compiled", **kwargs)
    assert torch.equal(dynamic.completion_ids, compiled.completion_ids)
    assert (dynamic.logprobs - compiled.logprobs).abs().max() < 0.05


def static_decode_step_to_explain(cfg):
    """The policy `cfg` builds (a 4-bit base) and `decoding.static_step_explainer` of it."""
    from lmmr1_lite.decoding import static_step_explainer

    policy = models.add_lora(models.load_base_model(cfg, torch.device("cpu")), cfg).eval()
    assert any(type(m).__name__ == "Linear4bit" for m in policy.modules()), "the base is 4-bit"
    return policy, static_step_explainer(policy)


def test_static_decode_step_traces_whole_over_a_4bit_base_with_lora(tiny_cfg):
    """decode_cache 'compiled' replays the step as a CUDA graph only if torch.compile traces it whole: over an NF4
    base (bitsandbytes Linear4bit) with the LoRA side path, in fp32 (peft's casts) and in bf16 under
    lora_autocast (the training step's rollouts), one graph and no graph break."""
    from lmmr1_lite.decoding import static_step_explainer

    def fp32_casts(explanation) -> int:
        return sum(node.op == "call_method" and node.target == "to" and node.kwargs.get("dtype") == torch.float32
                   for graph in explanation.graphs for node in graph.graph.nodes)

    policy, explain = static_decode_step_to_explain(tiny_cfg(quantization="nf4", dtype="bfloat16"))
    casts = {}
    for autocast, run in ((False, explain), (True, static_step_explainer(policy, lora_autocast=True))):
        explanation = run()
        assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
        assert explanation.graph_count == 1
        casts[autocast] = fp32_casts(explanation)
        torch._dynamo.reset()
    # peft's cast of each LoRA layer's input to its fp32 weights is in the graph without autocast, gone with it
    # (autocast casts the weights below dynamo's graph, when it is lowered)
    assert casts[False] - casts[True] == sum(1 for n, _ in policy.named_modules() if n.endswith("lora_A.default"))


def test_static_decode_step_traces_whole_from_merged_copies_of_a_4bit_base(tiny_cfg):
    """merge_for_rollouts on an NF4 base with decode_cache 'compiled': the step over the dense MergedLinear copies
    (no bitsandbytes call, no LoRA side path) is one graph with no graph break either."""
    from lmmr1_lite.rollout import MergedLinear, adapter_merged

    def bitsandbytes_calls(explanation) -> int:
        return sum("bitsandbytes" in str(node.target) for graph in explanation.graphs for node in graph.graph.nodes)

    policy, explain = static_decode_step_to_explain(tiny_cfg(quantization="nf4", dtype="bfloat16"))
    assert bitsandbytes_calls(explain()) > 0  # the side path's graph calls gemm_4bit
    torch._dynamo.reset()
    with adapter_merged(policy):
        assert any(isinstance(m, MergedLinear) for m in policy.modules())
        explanation = explain()
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    assert explanation.graph_count == 1 and bitsandbytes_calls(explanation) == 0


def test_static_decode_step_traces_whole_with_liger_modules_and_never_calls_liger(tiny_cfg, monkeypatch,
                                                                                  liger_kernel_calls):
    """With the RMSNorm and SwiGLU MLP `patch_with_liger` installs on CUDA, the traced step is still one graph and
    calls none of Liger's kernels (on the H200 Liger's Triton RMSNorm inside the graph made inductor skip CUDA
    graphs, 2026-12-04): they compute in plain torch while torch.compile traces them."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling

    calls = liger_kernel_calls
    rms_norm, swiglu_mlp = models.liger_modules_outside_compile()
    monkeypatch.setattr(modeling, "Qwen2_5_VLRMSNorm", rms_norm)
    monkeypatch.setattr(modeling, "Qwen2MLP", swiglu_mlp)
    torch._dynamo.reset()
    policy, explain = static_decode_step_to_explain(tiny_cfg(quantization="nf4", dtype="bfloat16"))
    assert any(isinstance(m, rms_norm) for m in policy.modules()) and any(isinstance(m, swiglu_mlp)
                                                                          for m in policy.modules())
    assert "rms_norm" in calls and "swiglu" in calls  # the prefill ran eagerly, through Liger
    calls.clear()
    explanation = explain()
    assert calls == []  # traced, and run as traced: no Liger kernel
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def test_rollouts_from_merged_weights_are_the_adapted_policy_and_leave_the_base_untouched(tiny_policy):
    """`adapter_merged` (merge_for_rollouts): greedy tokens and log-probs of the merged weights equal those of the
    LoRA side path, the adapter is live inside (merged into the weights, not dropped), and on exit every base
    weight is the same tensor with the same values and the side path is back."""
    from lmmr1_lite.rollout import adapter_merged

    policy, tokenizer, _ = tiny_policy
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    base = {n: (p, p.detach().clone()) for n, p in policy.named_parameters() if "base_layer" in n}
    kwargs = dict(num_generations=2, max_new_tokens=16, temperature=1.0, greedy=True, stop_ids=[])
    side_path = generate(policy, tokenizer, PROMPTS, **kwargs)
    with policy.disable_adapter():
        without = generate(policy, tokenizer, PROMPTS, **kwargs)
    with adapter_merged(policy):
        merged = generate(policy, tokenizer, PROMPTS, **kwargs)
    assert not torch.equal(without.completion_ids, side_path.completion_ids), "the adapter changes the tokens"
    assert torch.equal(merged.completion_ids, side_path.completion_ids)
    assert (merged.logprobs - side_path.logprobs).abs().max() < 1e-4
    for name, p in policy.named_parameters():
        if "base_layer" in name:
            assert p is base[name][0] and torch.equal(p, base[name][1]), name
    assert torch.equal(generate(policy, tokenizer, PROMPTS, **kwargs).completion_ids, side_path.completion_ids)


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_rollouts_from_a_quantised_base_merge_into_dense_copies_and_put_the_base_back(build_tiny_policy,
                                                                                      quantization):
    """merge_for_rollouts on a 4/8-bit base: inside `adapter_merged` each adapted bitsandbytes linear is a dense
    `MergedLinear` (its dequantised weight plus the LoRA delta) and the adapters are off; the greedy tokens and
    log-probs equal the side path's; on exit the same quantised modules and weights are back, untouched, and
    no merged copy is left in the model."""
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    from lmmr1_lite.rollout import MergedLinear, adapter_merged

    policy, tokenizer, _ = build_tiny_policy(quantization=quantization, gradient_checkpointing=False)
    quantised = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    bases = {name: m for name, m in policy.named_modules() if isinstance(m, quantised)}
    assert bases
    weights = {name: (p, p.detach().clone()) for name, p in policy.named_parameters()}
    kwargs = dict(num_generations=2, max_new_tokens=16, temperature=1.0, greedy=True, stop_ids=[])
    side_path = generate(policy, tokenizer, PROMPTS, **kwargs)
    with policy.disable_adapter():
        without = generate(policy, tokenizer, PROMPTS, **kwargs)
    with adapter_merged(policy):
        inside = {name: m for name, m in policy.named_modules()}
        assert not any(isinstance(m, quantised) for m in inside.values())
        assert all(isinstance(inside[name], MergedLinear) for name in bases)
        assert all(m.disable_adapters for m in inside.values() if isinstance(m, LoraLayer))
        merged = generate(policy, tokenizer, PROMPTS, **kwargs)
    assert not torch.equal(without.completion_ids, side_path.completion_ids), "the adapter changes the tokens"
    assert torch.equal(merged.completion_ids, side_path.completion_ids)
    # bitsandbytes' int8 matmul also rounds its input to int8 (LLM.int8's vector-wise quantisation); the dense copy
    # multiplies the unrounded input: same tokens, log-probs a few hundredths apart on this tiny model
    assert (merged.logprobs - side_path.logprobs).abs().max() < (1e-4 if quantization == "nf4" else 0.05)
    assert {name: m for name, m in policy.named_modules() if isinstance(m, quantised)} == bases
    assert not any(isinstance(m, MergedLinear) for m in policy.modules())
    assert not any(m.disable_adapters for m in policy.modules() if isinstance(m, LoraLayer))
    for name, p in policy.named_parameters():
        assert p is weights[name][0] and torch.equal(p, weights[name][1]), name
    assert torch.equal(generate(policy, tokenizer, PROMPTS, **kwargs).completion_ids, side_path.completion_ids)


def test_kept_merged_copies_are_refreshed_in_place_at_the_same_addresses(build_tiny_policy):
    """adapter_merged(keep=True) (merge_for_rollouts with decode_cache 'compiled', whose CUDA graphs need fixed
    addresses): a second call generates from the same tensors, refreshed in place with the LoRA as it is now (its
    tokens equal the side path's after the adapter changed); the copies are never parameters or state of the
    policy, and a call without keep drops them."""
    from lmmr1_lite.rollout import MergedLinear, adapter_merged

    policy, tokenizer, _ = build_tiny_policy(quantization="nf4", gradient_checkpointing=False)
    names = {n for n, _ in policy.named_parameters()}
    state = set(policy.state_dict())
    kwargs = dict(num_generations=2, max_new_tokens=12, temperature=1.0, greedy=True, stop_ids=[])

    def inside() -> tuple[dict, torch.Tensor]:
        with adapter_merged(policy, keep=True):
            weights = {n: m.weight for n, m in policy.named_modules() if isinstance(m, MergedLinear)}
            return weights, generate(policy, tokenizer, PROMPTS, **kwargs).completion_ids
    first, tokens = inside()
    assert first and torch.equal(tokens, generate(policy, tokenizer, PROMPTS, **kwargs).completion_ids)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.mul_(-3.0)  # an update that changes the adapted policy's tokens
    second, changed = inside()
    # the first call's tensors are still referenced here, so fresh copies could not reuse their memory
    assert second.keys() == first.keys() and all(second[n] is first[n] for n in first), "the same tensors"
    assert all(second[n].data_ptr() == first[n].data_ptr() for n in first), "at the same addresses"
    assert not torch.equal(changed, tokens)
    assert torch.equal(changed, generate(policy, tokenizer, PROMPTS, **kwargs).completion_ids)
    assert len(policy.__dict__["_merged_rollout_copies"]) == len(first)
    assert {n for n, _ in policy.named_parameters()} == names and set(policy.state_dict()) == state
    with adapter_merged(policy):
        pass
    assert "_merged_rollout_copies" not in policy.__dict__


def test_compiled_decode_from_kept_merged_copies_follows_the_updated_adapter(build_tiny_policy):
    """merge_for_rollouts with decode_cache 'compiled' (the kept copies refreshed in place): after the adapter
    changes, the compiled step (not compiled again) decodes the updated policy's tokens, not the weights it was
    traced with."""
    import torch._dynamo.utils as dynamo_utils

    from lmmr1_lite.rollout import adapter_merged

    policy, tokenizer, _ = build_tiny_policy(quantization="nf4", gradient_checkpointing=False)
    kwargs = dict(num_generations=1, max_new_tokens=12, temperature=1.0, greedy=True, stop_ids=[])

    def compiled() -> torch.Tensor:
        with adapter_merged(policy, keep=True):
            return generate(policy, tokenizer, PROMPTS, cache_mode="compiled", **kwargs).completion_ids
    torch._dynamo.reset()
    before = compiled()
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    assert torch.equal(before, generate(policy, tokenizer, PROMPTS, **kwargs).completion_ids)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.mul_(-3.0)
    after = compiled()
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs, "not compiled again"
    assert not torch.equal(after, before)
    assert torch.equal(after, generate(policy, tokenizer, PROMPTS, **kwargs).completion_ids)


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_rollouts_under_lora_autocast_run_the_side_path_in_bf16_and_cast_each_lora_weight_once(build_tiny_policy,
                                                                                                quantization):
    """generate(lora_autocast=True) on a model computing in bf16 (its base bf16 or NF4): every LoRA GEMM of every
    decode step takes a bf16 input (peft would cast it to fp32 and the output back, at every token), and each
    fp32 LoRA weight is cast to bf16 once for the whole generation (one autocast context around the loop: its
    cast cache), not once per token; the greedy tokens and their log-probs stay those of peft's fp32 side path
    to bf16 rounding, on text and image prompts (the vision tower's prefill under the same context)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    policy, tokenizer, cfg = build_tiny_policy(dtype="bfloat16", quantization=quantization,
                                               gradient_checkpointing=False)
    lora_weights = {p.untyped_storage().data_ptr(): name for name, p in policy.named_parameters()
                    if "lora_" in name}
    assert lora_weights and all(p.dtype == torch.float32 for n, p in policy.named_parameters() if "lora_" in n)

    class CastsOfLoraWeights(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.counts = dict.fromkeys(lora_weights.values(), 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default:
                name = lora_weights.get(args[0].untyped_storage().data_ptr())
                if name is not None:
                    self.counts[name] += 1
            return func(*args, **(kwargs or {}))

    lora_a = [m for n, m in policy.named_modules() if n.endswith("lora_A.default")]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype)) for m in lora_a]
    steps = 12
    runs = {}
    prompts = mixed_prompts(tokenizer)  # images through the vision tower in the prefill too
    processor = models.load_image_processor(cfg.model, 56 * 56, 112 * 112)
    for autocast in (False, True):
        seen.clear()
        with CastsOfLoraWeights() as casts:
            runs[autocast] = generate(policy, tokenizer, prompts, num_generations=1, max_new_tokens=steps,
                                      temperature=1.0, greedy=True, stop_ids=[], lora_autocast=autocast,
                                      image_processor=processor)
        assert runs[autocast].completion_ids.shape[1] == steps
        assert len(seen) == len(lora_a) * steps  # the prefill and each step but the last
        assert set(seen) == {torch.bfloat16 if autocast else torch.float32}
        assert set(casts.counts.values()) == ({1} if autocast else {0}), casts.counts
    for hook in hooks:
        hook.remove()
    assert torch.equal(runs[True].completion_ids, runs[False].completion_ids)
    assert (runs[True].logprobs - runs[False].logprobs).abs().max() < 0.05


@pytest.mark.parametrize("cache_mode", ["dynamic", "static"])
def test_a_deadline_cuts_every_running_row_at_one_length_and_marks_it_clipped(tiny_policy, cache_mode):
    """generate(deadline=...) (a benchmark's time budget; HF's max_time as a point in time): no decode step starts
    after it, so a deadline already past leaves one token per row, every row clipped (none reached a stop); a
    deadline far ahead changes nothing."""
    import time

    policy, tokenizer, _ = tiny_policy
    kwargs = dict(num_generations=3, max_new_tokens=10, temperature=1.0, greedy=False, stop_ids=[],
                  cache_mode=cache_mode)
    torch.manual_seed(0)
    free = generate(policy, tokenizer, PROMPTS, **kwargs)
    torch.manual_seed(0)
    far = generate(policy, tokenizer, PROMPTS, deadline=time.monotonic() + 3600, **kwargs)
    assert free.completion_ids.shape == (6, 10) and bool(free.clipped.all())
    assert torch.equal(far.completion_ids, free.completion_ids) and torch.equal(far.clipped, free.clipped)
    torch.manual_seed(0)
    cut = generate(policy, tokenizer, PROMPTS, deadline=time.monotonic(), **kwargs)
    assert cut.completion_ids.shape == (6, 1) and cut.completion_mask.sum().item() == 6
    assert torch.equal(cut.completion_ids, free.completion_ids[:, :1]) and bool(cut.clipped.all())
    assert torch.equal(cut.logprobs, free.logprobs[:, :1])


# --- the dynamic decode cache: buffers written in place --------------------------------------------------------
def cache_layers_seen(policy):
    """`(hook, seen)`: `seen` gets, at each backbone forward that is given a cache, the types of its layers and,
    for each layer, `(keys.data_ptr(), rows, length)` of the tensors it holds."""
    seen = []

    def record(mod, args, kwargs):
        cache = kwargs.get(models.cache_keyword(mod))
        if cache is not None:
            seen.append(([type(layer) for layer in cache.layers],
                         [(layer.keys.data_ptr(), *layer.keys.shape[::2]) for layer in cache.layers]))
    return models.backbone(policy).register_forward_pre_hook(record, with_kwargs=True), seen


def test_in_place_kv_cache_gives_the_concatenating_caches_tokens_and_logprobs(tiny_policy, monkeypatch):
    """decode_cache 'dynamic' decodes over `InPlaceKVLayer`s (buffers written in place) where HF's DynamicLayer
    concatenated at every step: the same tokens and log-probs as HF's layers, greedy and sampled, text and image
    prompts, G = 3 rows from each prompt's one prefill (copied straight into the buffers), rows finishing at
    different steps and leaving the batch."""
    from lmmr1_lite import decoding
    from lmmr1_lite.decoding import InPlaceKVLayer
    from lmmr1_lite.rollout import decode, encode_prompts, placeholder_ids

    policy, tokenizer, cfg = tiny_policy
    processor = models.load_image_processor(cfg.model, 56 * 56, 112 * 112)
    messages = mixed_prompts(tokenizer)
    stops = stop_token_ids(tokenizer, ["</answer>"])
    hf_layers = decoding.in_place_cache

    def both(run):
        """`run()` with our layers, then with HF's (the cache left as the prefill returned it)."""
        hook, seen = cache_layers_seen(policy)
        try:
            ours = run()
            assert seen and all(set(types) == {InPlaceKVLayer} for types, _ in seen), "decoded over our layers"
            # under 128 new tokens: no reallocation, and the rows that leave are moved within the same storage
            assert all([p for p, *_ in layers] == [p for p, *_ in seen[0][1]] for _, layers in seen)
            assert seen[-1][1][0][1] < seen[0][1][0][1], "rows left"
            monkeypatch.setattr(decoding, "in_place_cache", lambda *a: False)
            seen.clear()
            theirs = run()
            assert all(InPlaceKVLayer not in types for types, _ in seen)
        finally:
            monkeypatch.setattr(decoding, "in_place_cache", hf_layers)
            hook.remove()
        return ours, theirs

    def sampled():
        torch.manual_seed(0)
        return generate(policy, tokenizer, messages * 2, num_generations=3, max_new_tokens=30, temperature=1.0,
                        stop_ids=stops, image_processor=processor)
    ours, theirs = both(sampled)
    lengths = ours.completion_mask.sum(1)
    assert lengths.unique().numel() > 2 and int(lengths.min()) < 30, "rows finish at different steps"
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    assert torch.equal(ours.logprobs, theirs.logprobs)

    policy.eval()
    enc, vision = encode_prompts(tokenizer, messages, policy.device, processor)
    free = decode(policy, enc["input_ids"], enc["attention_mask"], models.stack_vision(vision), count=3,
                  max_new_tokens=25, temperature=1.0, stop_ids=[], pad_id=tokenizer.pad_token_id, greedy=True,
                  suppress=placeholder_ids(tokenizer))[0]
    greedy_stops = [int(free[0, 5]), int(free[6, 12])]  # tokens the greedy rows reach at different steps
    ours, theirs = both(lambda: decode(policy, enc["input_ids"], enc["attention_mask"], models.stack_vision(vision),
                                       count=3, max_new_tokens=25, temperature=1.0, stop_ids=greedy_stops,
                                       pad_id=tokenizer.pad_token_id, greedy=True, suppress=placeholder_ids(tokenizer),
                                       mm_token_type_ids=models.multimodal_token_types(enc["input_ids"],
                                                                                      models.unwrap(policy).config)))
    policy.train()
    assert ours[1].unique().numel() > 1 and int(ours[1].min()) < 25
    for mine, hf in zip(ours, theirs):
        assert torch.equal(mine, hf)


def test_in_place_kv_cache_grows_geometrically_never_per_step(tiny_policy):
    """Over a generation longer than the first capacity (the prompt + 128 tokens) each layer's buffer is
    reallocated at most ceil(log2(limit / first capacity)) times (limit: the prompt + max_new_tokens), and at
    least once here; at every other step the layer hands attention a view of the same storage. Rows that leave
    are moved to the front of the same buffers."""
    import math

    from lmmr1_lite.decoding import InPlaceKVLayer

    policy, tokenizer, _ = tiny_policy
    hook, seen = cache_layers_seen(policy)
    max_new = 300
    torch.manual_seed(0)
    try:
        batch = generate(policy, tokenizer, PROMPTS, num_generations=2, max_new_tokens=max_new, temperature=1.0,
                         stop_ids=[])
    finally:
        hook.remove()
    prompt = batch.prompt_ids.shape[1]
    assert batch.completion_ids.shape == (4, max_new)
    steps = [layers for types, layers in seen]  # each decode step's cache (the prefill is given none)
    assert len(steps) == max_new - 1 and all(set(types) == {InPlaceKVLayer} for types, _ in seen)
    bound = math.ceil(math.log2((prompt + max_new) / (prompt + 128)))
    for layer in range(len(steps[0])):
        pointers = [step[layer][0] for step in steps]
        moves = sum(a != b for a, b in zip(pointers, pointers[1:]))
        assert 1 <= moves <= bound, (layer, moves, bound)
        assert [step[layer][2] for step in steps] == list(range(prompt, prompt + max_new - 1))


@pytest.mark.parametrize("prompt,max_new", [(5, 300), (107, 1024), (40, 90)])
def test_in_place_capacity_is_what_the_layers_hold_at_every_length(prompt, max_new):
    """`decoding.in_place_capacity` (what bench/e2e_step.py's planner figure of a generation stopped early uses) is
    the capacity a layer of `in_place_cache` has after each decode step's one-token write, to the end."""
    from transformers.cache_utils import DynamicCache

    from lmmr1_lite.decoding import in_place_cache, in_place_capacity

    cache = DynamicCache()
    cache.update(torch.zeros(1, 1, prompt, 1), torch.zeros(1, 1, prompt, 1), 0)
    assert in_place_cache(cache, 1, max_new)
    layer, seen = cache.layers[0], set()
    for held in range(prompt + 1, prompt + max_new + 1):
        assert layer.capacity == in_place_capacity(prompt, held - 1, max_new)
        layer.update(torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))
        assert layer.capacity == in_place_capacity(prompt, held, max_new), held
        seen.add(layer.capacity)
    assert max(seen) == prompt + max_new and len(seen) >= (2 if max_new > 128 else 1)


def test_in_place_kv_layer_matches_hf_dynamic_layer_and_compacts_in_its_own_storage():
    """`InPlaceKVLayer` against HF's `DynamicLayer` through the operations a generation (and beam search) uses:
    a prompt's cache repeated to G rows, writes past the capacity, rows leaving, a reorder, a repeat, a crop.
    The same keys and values throughout; rows leaving keep the storage, and writes within the capacity too."""
    from transformers.cache_utils import DynamicLayer

    from lmmr1_lite.decoding import InPlaceKVLayer

    generator = torch.Generator().manual_seed(0)

    def draw(rows, tokens):
        return torch.randn(rows, 2, tokens, 8, generator=generator), torch.randn(rows, 2, tokens, 8,
                                                                                 generator=generator)
    prompt = DynamicLayer()
    prompt.update(*draw(2, 5))
    hf = DynamicLayer()
    hf.update(prompt.keys, prompt.values)
    hf.batch_repeat_interleave(3)
    ours = InPlaceKVLayer.from_layer(prompt, 3, capacity=7, limit=5 + 20)
    assert ours.dtype == torch.float32 and ours.device == torch.device("cpu") and ours.is_initialized

    def same():
        assert torch.equal(ours.keys, hf.keys) and torch.equal(ours.values, hf.values)
        assert ours.get_seq_length() == hf.get_seq_length() and ours.get_mask_sizes(1) == hf.get_mask_sizes(1)
        assert ours.keys.data_ptr() == ours.buffers[0].data_ptr()  # a view of the buffer
    same()
    capacities = []
    for step in range(20):
        before = ours.buffers[0].data_ptr()
        new = draw(hf.keys.shape[0], 1)
        for a, b in zip(ours.update(*new), hf.update(*new)):
            assert torch.equal(a, b)
        grew = ours.capacity != (capacities or [7])[-1]
        capacities.append(ours.capacity)
        assert (ours.buffers[0].data_ptr() != before) == grew
        if step in (4, 11):  # rows leave
            keep = torch.tensor([0, 2, 3, 5]) if step == 4 else torch.tensor([1, 3])
            storage = [(b.data_ptr(), b.shape) for b in ours.buffers]
            ours.batch_select_indices(keep)
            hf.batch_select_indices(keep)
            assert [(b.data_ptr(), b.shape) for b in ours.buffers] == storage and ours.rows == len(keep)
        same()
    assert capacities == [7] * 2 + [14] * 7 + [25] * 11  # doubled, then cut at the limit: 2 reallocations
    assert ours.allocations == 3 and ours.buffers[0].shape[0] == 4  # the last sized for the 4 rows running then
    for apply in (lambda layer: layer.reorder_cache(torch.tensor([1, 0])),
                  lambda layer: layer.batch_repeat_interleave(2), lambda layer: layer.crop(-4)):
        apply(ours)
        apply(hf)
        same()
    new = draw(4, 1)
    for a, b in zip(ours.update(*new), hf.update(*new)):
        assert torch.equal(a, b)


def test_in_place_cache_leaves_caches_of_other_layer_types_to_hf():
    """`decoding.in_place_cache` replaces only a cache whose layers are all plain, filled `DynamicLayer`s (each
    prompt's keys repeated to its rows); a sliding-window layer, an empty layer or an object without layers
    leaves the cache as it is (decode then repeats it with HF's `batch_repeat_interleave`)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    from lmmr1_lite.decoding import InPlaceKVLayer, in_place_cache

    keys = torch.arange(2 * 2 * 3 * 4, dtype=torch.float32).view(2, 2, 3, 4)

    def cache_of(*layers):
        cache = DynamicCache()
        cache.layers = list(layers)
        for layer in layers:
            layer.update(keys, -keys)
        return cache
    ours = cache_of(DynamicLayer(), DynamicLayer())
    assert in_place_cache(ours, 3, 10)
    assert all(type(layer) is InPlaceKVLayer and layer.capacity == 3 + 10 for layer in ours.layers)
    assert torch.equal(ours.layers[1].values, -keys.repeat_interleave(3, 0)) and ours.get_seq_length() == 3
    mixed = cache_of(DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=8))
    empty = DynamicCache()
    empty.layers = [DynamicLayer()]
    offloaded = cache_of(DynamicLayer(), DynamicLayer())
    offloaded.offloading = True  # HF moves its layers to the CPU and back between forwards: left to HF
    for cache in (mixed, empty, offloaded):
        before = list(cache.layers)
        assert not in_place_cache(cache, 3, 10) and cache.layers == before
    assert not in_place_cache(object(), 3, 10)
    ours.reset()  # HF's reset: the layers empty again, and the next write starts a new cache
    assert ours.get_seq_length() == 0 and all(layer.buffers is None for layer in ours.layers)
    ours.layers[0].update(keys[:1], -keys[:1])
    assert torch.equal(ours.layers[0].keys, keys[:1]) and ours.layers[0].rows == 1

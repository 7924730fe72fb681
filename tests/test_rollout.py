"""Generation: KV cache on, stops at EOS / stop tokens, masks after the stop."""
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

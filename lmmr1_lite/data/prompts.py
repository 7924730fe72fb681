"""Prompts: chat messages for a row (system turn, images, the prompt through `prompt_template`), the
prompt's length in tokens, and `prepare` (images resized, over-long prompts dropped and counted)."""
from __future__ import annotations

from ..example import Example
from .images import fit_pixels, resolve_images
from .loading import LoadReport


def _messages(example: Example, system_prompt: str, prompt_template: str, images: list) -> list[dict]:
    system = example.system if example.system is not None else system_prompt
    text = prompt_template.replace("{prompt}", example.prompt)
    messages = [{"role": "system", "content": system}] if system else []
    if images:
        content = [{"type": "image", "image": image} for image in images]
        content.append({"type": "text", "text": text})
        messages.append({"role": "user", "content": content})
    else:
        messages.append({"role": "user", "content": text})
    return messages


def build_messages(example: Example, system_prompt: str = "", prompt_template: str = "{prompt}") -> list[dict]:
    """OpenAI-style chat messages: optional system turn (the row's own wins), then the user turn
    (images first, as PIL images decoded now, then the prompt text wrapped by `prompt_template`)."""
    return _messages(example, system_prompt, prompt_template, resolve_images(example.images))


def answer_kind(example: Example) -> str:
    """For summaries: choice letter, number, yes/no, latex, sokoban or text."""
    if example.meta.get("level"):
        return "sokoban"
    text = example.answer.strip().strip("$").strip("()")
    if len(text) == 1 and text.upper() in "ABCDEFGH":
        return "choice"
    try:
        float(text.replace(",", ""))
        return "number"
    except ValueError:
        pass
    if text.lower() in ("yes", "no"):
        return "yes/no"
    return "latex" if any(ch in text for ch in "\\^{}_/") else "text"


IMAGE_TOKEN_PIXELS = 28 * 28  # Qwen2.5-VL: one LLM token per 28x28 patch group (14-px patches merged 2x2)


def prompt_tokens(example: Example, tokenizer, system_prompt: str = "", prompt_template: str = "{prompt}") -> int:
    """Prompt length in tokens as the model sees it: chat template text plus the image tokens."""
    messages = _messages(example, system_prompt, prompt_template, example.images)  # the template reads no pixels
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_tokens = sum(max(1, round(im.size[0] * im.size[1] / IMAGE_TOKEN_PIXELS)) for im in example.images)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"]) + image_tokens


def prepare(examples: list[Example], tokenizer, system_prompt: str, max_prompt_tokens: int,
            min_pixels: int, max_pixels: int, report: LoadReport | None = None,
            prompt_template: str = "{prompt}") -> list[Example]:
    """Resize images into [min_pixels, max_pixels] and drop (and count) prompts over max_prompt_tokens:
    a prompt is never truncated, so image tokens can never be cut. `ImageRef`s stay undecoded: they
    resize when a prompt is built."""
    kept = []
    for example in examples:
        if example.images:
            example.images = [fit_pixels(image, min_pixels, max_pixels) for image in example.images]
        if prompt_tokens(example, tokenizer, system_prompt, prompt_template) > max_prompt_tokens:
            if report is not None:
                report.skipped["prompt longer than max_prompt_tokens"] += 1
            continue
        kept.append(example)
    return kept

"""`eval` (base vs adapters, one table) and `export --merge` round trip, on tiny runs."""
import importlib.util
import json

import pytest
import torch

from lmmr1_lite.cli import main

SMALL = ["--eval-size", "8", "--prompts-per-step", "4", "--num-generations", "4"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for name, steps in (("a", 3), ("b", 5)):
        assert main(["train", "--output-dir", str(root / name), "--max-steps", str(steps), "--set",
                     "learning_rate=0.01"] + SMALL) == 0
    return root


def test_eval_table_for_base_and_two_adapters(two_runs, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", "--adapter", str(two_runs / "a" / "adapter"), "--adapter", str(two_runs / "b" / "adapter"),
                 "--data", "tiny_color_text", "--limit", "8", "--pass-k", "2", "--out", str(out)]) == 0
    results = json.loads((out / "eval.json").read_text())["results"]
    assert len(results) == 3 and all(r["n"] == 8 and "pass@2" in r for r in results.values())
    table = (out / "eval.md").read_text()
    assert table.count("\n") == 5 and "a/adapter" in table and "b/adapter" in table and "base" in table
    # same held-out prompts, same template, same verifier: the numbers the training run printed
    trained = json.loads((two_runs / "b" / "eval.json").read_text())["after"]
    mine = results["b/adapter"]
    assert (mine["accuracy"], mine["format"]) == (trained["accuracy"], trained["format"])
    assert [s["completion"] for s in mine["samples"]] == [s["completion"] for s in trained["samples"]]
    assert "| model |" in capsys.readouterr().out


def test_export_merged_matches_adapter_greedy(two_runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from lmmr1_lite import models
    from lmmr1_lite.rollout import generate, stop_token_ids

    out = tmp_path / "merged"
    assert main(["export", "--adapter", str(two_runs / "b" / "adapter"), "--out", str(out), "--merge",
                 "--dtype", "float32"]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert (out / "preprocessor_config.json").exists() and (out / "tokenizer.json").exists()
    base = AutoModelForImageTextToText.from_pretrained(two_runs / "b" / "base_model")
    adapted = PeftModel.from_pretrained(base, two_runs / "b" / "adapter")
    tokenizer = models.load_tokenizer(str(out))
    prompts = [[{"role": "user", "content": f"the {shape} is {color} . what color"}]
               for shape, color in [("circle", "red"), ("square", "blue"), ("triangle", "green"), ("circle", "yellow")]]
    stops = stop_token_ids(tokenizer, ["</answer>"])
    outs = [generate(m, tokenizer, prompts, num_generations=1, max_new_tokens=10, temperature=1.0, stop_ids=stops,
                     greedy=True).completion_ids for m in (merged, adapted)]
    assert torch.equal(outs[0], outs[1])
    assert main(["export", "--adapter", str(two_runs / "b" / "adapter"), "--out", str(out)]) == 2, "never overwrites"
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "tiny_color_text" in card and "GRPO steps: 5" in card and "| after |" in card


def test_adapter_loads_with_peft_auto_class(two_runs):
    """peft's AutoPeftModelForCausalLM cannot map a Qwen2.5-VL config; the adapter names its base class, so
    the generic `AutoPeftModel` rebuilds it from the adapter directory alone."""
    from peft import AutoPeftModel

    model = AutoPeftModel.from_pretrained(two_runs / "a" / "adapter")
    assert type(model.get_base_model()).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert any("lora_A" in n for n, _ in model.named_parameters())


@pytest.fixture(scope="module")
def exported(two_runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "merged"
    assert main(["export", "--adapter", str(two_runs / "a" / "adapter"), "--out", str(out), "--merge"]) == 0
    return out


def test_exported_directory_loads_with_the_standard_auto_classes(exported):
    """What the harnesses load by path: the model, the tokenizer with its chat template, the image processor."""
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

    model = AutoModelForImageTextToText.from_pretrained(exported)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration" and model.dtype == torch.bfloat16
    tokenizer = AutoTokenizer.from_pretrained(exported)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color"}]}]
    assert "<|image_pad|>" in tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    pixels = AutoImageProcessor.from_pretrained(exported)(images=[Image.new("RGB", (112, 112))], return_tensors="pt")
    assert pixels["image_grid_thw"].tolist() == [[1, 8, 8]]
    with torch.no_grad():
        features = model.model.get_image_features(pixels["pixel_values"].to(model.dtype), pixels["image_grid_thw"])
    assert torch.cat(features.pooler_output).shape[0] == 16, "64 patches merged 2x2: 16 image tokens"


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="transformers 5's Qwen2.5-VL video processor, which AutoProcessor builds, needs torchvision")
def test_exported_directory_loads_with_auto_processor(exported):
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(exported)
    text = "<|vision_start|><|image_pad|><|vision_end|>what color"
    assert processor(text=[text], images=[Image.new("RGB", (112, 112))], return_tensors="pt")["input_ids"].shape[1] > 16

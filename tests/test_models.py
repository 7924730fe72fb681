"""One copy of the weights: the reference is the adapter switched off; only LoRA trains."""
import pytest
import torch

from lmmr1_kernels import grpo_loss, token_logprobs
from lmmr1_lite import models
from lmmr1_lite.rollout import encode_prompts


def _batch(tokenizer):
    messages = [[{"role": "user", "content": "max(3,7)"}], [{"role": "user", "content": "max(12,4)"}]]
    enc, _ = encode_prompts(tokenizer, messages, torch.device("cpu"))
    targets = torch.roll(enc["input_ids"], -1, dims=1)
    return enc, targets


def test_adapter_disabled_logprobs_equal_base_model(tiny_policy, tiny_cfg):
    policy, tokenizer, cfg = tiny_policy
    enc, targets = _batch(tokenizer)
    weight = models.lm_head_weight(policy)
    with torch.no_grad():
        with policy.disable_adapter():
            ref = token_logprobs(models.hidden_states(policy, **enc), weight, targets)
        adapted = token_logprobs(models.hidden_states(policy, **enc), weight, targets)
        base = models.load_base_model(cfg, torch.device("cpu"))  # same seed, no LoRA: the true base
        logits = base(**enc).logits.double()
        expected = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    keep = enc["attention_mask"].bool()
    assert torch.allclose(ref[keep].double(), expected[keep], atol=1e-5)
    assert (adapted[keep] - ref[keep]).abs().max() > 1e-3, "the adapter must change the policy"


def test_only_lora_parameters_get_gradients_and_change(tiny_policy):
    policy, tokenizer, cfg = tiny_policy
    enc, targets = _batch(tokenizer)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainable = [p for p in policy.parameters() if p.requires_grad]
    policy.train()
    loss, _ = grpo_loss(models.hidden_states(policy, **enc), models.lm_head_weight(policy), targets,
                        enc["attention_mask"], torch.tensor([1.0, -1.0]))
    loss.backward()
    with_grad = [n for n, p in policy.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert with_grad and all("lora_" in n for n in with_grad)
    assert all("language_model" in n for n in with_grad), "no LoRA on the vision tower"
    torch.optim.AdamW(trainable, lr=1e-2).step()
    for name, p in policy.named_parameters():
        changed = not torch.equal(p, before[name])
        assert changed == ("lora_" in name and name in with_grad), name


def test_reference_shares_every_weight(tiny_policy, tiny_cfg):
    """No second copy: the policy holds exactly one base model's parameters plus LoRA, and the
    adapter-disabled reference reads the very same tensors."""
    policy, _, cfg = tiny_policy
    fresh = models.load_base_model(cfg, torch.device("cpu"))
    base_numel = sum(p.numel() for p in fresh.parameters())
    held = {p.data_ptr(): p.numel() for n, p in policy.named_parameters() if "lora_" not in n}
    assert sum(held.values()) == base_numel
    lora = sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n)
    assert 0 < lora < base_numel
    with policy.disable_adapter():
        assert {p.data_ptr() for n, p in policy.named_parameters() if "lora_" not in n} == set(held)


def test_instruct_prior_teaches_the_format_and_answer_words_not_the_answers(tiny_cfg):
    from lmmr1_lite.data import build_messages
    from lmmr1_lite.evaluate import evaluate_model
    from lmmr1_lite.rewards import accuracy_batch, extract_answer
    from lmmr1_lite.rollout import generate, stop_token_ids
    from lmmr1_lite.tasks import COLORS
    from lmmr1_lite.tasks import generate as draw
    from lmmr1_lite.tiny import instruct_prior

    cfg = tiny_cfg(instruct_prior_steps=60)
    tokenizer = models.load_tokenizer(cfg.model)
    model = models.load_base_model(cfg, torch.device("cpu"))
    train, test = draw("tiny_color_text", 500, 100, seed=0)
    assert evaluate_model(model, tokenizer, test, cfg)["format"] == 0.0, "random weights answer in no form"
    untouched = {n: p.clone() for n, p in model.named_parameters() if ".visual." in f".{n}"}
    instruct_prior(model, tokenizer, train, cfg)
    assert evaluate_model(model, tokenizer, test, cfg)["format"] == 1.0
    assert all(torch.equal(p, untouched[n]) for n, p in model.named_parameters() if n in untouched), "vision frozen"
    torch.manual_seed(0)
    batch = generate(model, tokenizer, [build_messages(e) for e in test], num_generations=8, max_new_tokens=12,
                     temperature=1.0, stop_ids=stop_token_ids(tokenizer, cfg.stop_tokens))
    answers = [extract_answer(t) for t in batch.texts]
    shares = {c: answers.count(c) / len(answers) for c in COLORS}
    assert all(0.1 < share < 0.45 for share in shares.values()), shares  # every colour word, none dominant
    accuracy = sum(accuracy_batch(batch.texts, [e.answer for e in test for _ in range(8)])) / len(answers)
    assert 0.1 < accuracy < 0.4, f"the prior must not teach the answers: sampled accuracy {accuracy:.2f}"


@pytest.mark.parametrize("quantization,checkpointing", [("none", False), ("none", True), ("nf4", True)])
def test_lora_autocast_runs_the_side_path_in_bf16_and_keeps_fp32_gradients(build_tiny_policy, quantization,
                                                                           checkpointing):
    """`lora_autocast` on a model computing in bf16, its base in bf16 or NF4 (the 3B configs): every LoRA GEMM
    gets a bf16 input (peft would cast it to the fp32 LoRA weights), the loss and the fp32 LoRA gradients agree
    with peft's fp32 side path to bf16 rounding, also when gradient checkpointing recomputes the layers in
    backward (outside the context: `models.recompute_with_forward_casting` keeps peft's casts off there too)."""
    policy, tokenizer, cfg = build_tiny_policy(dtype="bfloat16", quantization=quantization,
                                               gradient_checkpointing=checkpointing)
    if quantization == "nf4":
        import bitsandbytes as bnb
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in policy.modules())
    enc, targets = _batch(tokenizer)
    lora_a = [m for n, m in policy.named_modules() if n.endswith("lora_A.default")]
    seen = []
    hooks = [m.register_forward_pre_hook(lambda _, args: seen.append(args[0].dtype)) for m in lora_a]
    trainable = {n: p for n, p in policy.named_parameters() if p.requires_grad}
    assert lora_a and all(p.dtype == torch.float32 for p in trainable.values())
    policy.train()
    runs = {}
    for autocast in (False, True):
        seen.clear()
        policy.zero_grad()
        with models.lora_autocast(policy, autocast):
            hidden = models.hidden_states(policy, **enc)
        assert hidden.dtype == torch.bfloat16
        loss, _ = grpo_loss(hidden, models.lm_head_weight(policy), targets, enc["attention_mask"],
                            torch.tensor([1.0, -1.0]))
        loss.backward()
        # the forward's and, with checkpointing, the backward's recompute (outside the context): all in bf16
        assert len(seen) == len(lora_a) * (2 if checkpointing else 1)
        assert set(seen) == {torch.bfloat16 if autocast else torch.float32}
        grads = {n: p.grad for n, p in trainable.items()}
        assert all(g is not None and g.dtype == torch.float32 for g in grads.values())
        runs[autocast] = loss.detach(), torch.cat([g.flatten() for g in grads.values()])
    (loss_fp32, grad_fp32), (loss_bf16, grad_bf16) = runs[False], runs[True]
    assert abs(loss_bf16 - loss_fp32) <= 2e-2 * abs(loss_fp32) + 1e-3
    cosine = torch.nn.functional.cosine_similarity(grad_bf16, grad_fp32, dim=0)
    assert cosine > 0.99 and not torch.equal(grad_bf16, grad_fp32), cosine
    for hook in hooks:
        hook.remove()


def test_lora_autocast_leaves_an_fp32_base_alone(tiny_policy):
    """On an fp32 base (the tiny default) the context changes nothing: no autocast, peft's casts stay on."""
    policy, tokenizer, _ = tiny_policy
    enc, _ = _batch(tokenizer)
    with torch.no_grad():
        plain = models.hidden_states(policy, **enc)
        with models.lora_autocast(policy):
            assert not torch.is_autocast_enabled("cpu")
            inside = models.hidden_states(policy, **enc)
    assert torch.equal(plain, inside)


def test_saved_random_weights_load_as_the_random_init_model(tiny_cfg, tmp_path):
    """bench/e2e_step.py writes a random-weight model first and measures a pretrained-style load of it: the same
    weights as `random_init` (same seed, same device), and the seed matters."""
    from dataclasses import replace

    cfg = tiny_cfg()
    models.save_random_weights(cfg, torch.device("cpu"), tmp_path)
    loaded = models.load_base_model(replace(cfg, model=str(tmp_path), random_init=False), torch.device("cpu"))
    drawn = models.load_base_model(cfg, torch.device("cpu"))
    other = models.random_model(drawn.config, cfg.seed + 1, torch.device("cpu"), dtype=drawn.dtype)
    loaded, drawn, other = loaded.state_dict(), drawn.state_dict(), other.state_dict()
    assert loaded.keys() == drawn.keys()
    assert all(torch.equal(loaded[k], drawn[k]) for k in drawn)
    assert not all(torch.equal(other[k], drawn[k]) for k in drawn)


def test_liger_modules_step_aside_under_torch_compile(liger_kernel_calls):
    """Liger's RMSNorm and SwiGLU MLP as `patch_with_liger` installs them: eager calls run Liger's kernels, while
    torch.compile traces the plain torch form (whole, no Liger call), equal to transformers' own modules. Liger's
    Triton RMSNorm inside the compiled decode made inductor skip CUDA graphs on the H200 (2026-12-04)."""
    from transformers import AutoConfig
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling

    from lmmr1_lite.config import TINY_MODEL_DIR

    calls = liger_kernel_calls
    rms_norm, swiglu_mlp = models.liger_modules_outside_compile()
    config = AutoConfig.from_pretrained(TINY_MODEL_DIR).text_config
    torch.manual_seed(0)
    ours, theirs = rms_norm(config.hidden_size, eps=1e-6), modeling.Qwen2_5_VLRMSNorm(config.hidden_size, eps=1e-6)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        theirs.weight.copy_(ours.weight)
    mlp, hf_mlp = swiglu_mlp(config), modeling.Qwen2MLP(config)
    hf_mlp.load_state_dict(mlp.state_dict())
    x = torch.randn(3, 5, config.hidden_size, dtype=torch.float32)

    ours(x), mlp(x)
    assert calls == ["rms_norm", "swiglu"]  # eager: Liger
    calls.clear()
    torch._dynamo.reset()
    with torch.no_grad():
        compiled_norm = torch.compile(ours, backend="aot_eager", fullgraph=True)(x.bfloat16().float())
        compiled_mlp = torch.compile(mlp, backend="aot_eager", fullgraph=True)(x)
        assert calls == []  # traced: transformers' form, no Liger
        torch.testing.assert_close(compiled_norm, theirs(x.bfloat16().float()))
        torch.testing.assert_close(compiled_mlp, hf_mlp(x))


def test_patch_with_liger_installs_the_modules_that_step_aside_under_compile(monkeypatch):
    """On CUDA `patch_with_liger` puts those classes where Liger's patch put its own (the names transformers'
    Qwen2.5-VL builds its layers from); a CPU keeps transformers' modules."""
    liger = pytest.importorskip("liger_kernel.transformers")
    from liger_kernel.transformers.rms_norm import LigerRMSNorm
    from liger_kernel.transformers.swiglu import LigerSwiGLUMLP
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling

    for name in ("Qwen2RMSNorm", "Qwen2_5_VLRMSNorm", "Qwen2MLP"):
        if hasattr(modeling, name):  # put back after the test, whatever the patch does
            monkeypatch.setattr(modeling, name, getattr(modeling, name))

    def liger_class_patch(**_):  # what Liger's own patch does to these names (its model forward left out: this
        modeling.Qwen2_5_VLRMSNorm = LigerRMSNorm  # liger-kernel 0.8.5 fails to import that with transformers 5.25)
        modeling.Qwen2MLP = LigerSwiGLUMLP

    monkeypatch.setattr(liger, "apply_liger_kernel_to_qwen2_5_vl", liger_class_patch)
    models.patch_with_liger(torch.device("cpu"))
    assert modeling.Qwen2MLP.__module__.startswith("transformers.")
    models.patch_with_liger(torch.device("cuda"))  # swaps classes only: nothing runs on the device
    rms_norm, swiglu_mlp = models.liger_modules_outside_compile()
    assert modeling.Qwen2_5_VLRMSNorm is rms_norm and modeling.Qwen2MLP is swiglu_mlp


def test_patch_with_liger_gives_liger_rope_outside_compile_and_transformers_rope_inside(monkeypatch):
    """Where transformers still has `apply_multimodal_rotary_pos_emb` (Liger's RoPE replaces it): eager calls get
    Liger's, torch.compile traces transformers' own; a second load wraps transformers' function again, not the
    first load's wrapper."""
    liger = pytest.importorskip("liger_kernel.transformers")
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling

    def hf_rope(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
        return q + 1, k + 1

    def liger_rope(q, k, cos, sin, mrope_section, unsqueeze_dim=1):
        return q + 2, k + 2

    monkeypatch.setattr(modeling, "apply_multimodal_rotary_pos_emb", hf_rope, raising=False)
    monkeypatch.setattr(liger, "apply_liger_kernel_to_qwen2_5_vl",
                        lambda **_: setattr(modeling, "apply_multimodal_rotary_pos_emb", liger_rope))
    for name in ("Qwen2RMSNorm", "Qwen2_5_VLRMSNorm", "Qwen2MLP"):
        if hasattr(modeling, name):
            monkeypatch.setattr(modeling, name, getattr(modeling, name))
    models.patch_with_liger(torch.device("cuda"))
    models.patch_with_liger(torch.device("cuda"))
    rope = modeling.apply_multimodal_rotary_pos_emb
    assert rope.hf_rope is hf_rope
    q = torch.zeros(2)
    assert rope(q, q, None, None, None)[0].tolist() == [2.0, 2.0]  # eager: Liger's
    torch._dynamo.reset()
    traced = torch.compile(lambda x: modeling.apply_multimodal_rotary_pos_emb(x, x, None, None, None)[0],
                           backend="eager", fullgraph=True)
    assert traced(q).tolist() == [1.0, 1.0]  # traced: transformers'


def test_a_liger_kernel_that_does_not_fit_transformers_is_a_warning(monkeypatch):
    """liger-kernel 0.8.5's Qwen2.5-VL patch fails to import under transformers 5.25: the run goes on with
    transformers' modules and says so, instead of failing at the model's load."""
    liger = pytest.importorskip("liger_kernel.transformers")
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as modeling

    def broken(**_):
        raise ImportError("cannot import name 'LigerQwen2_5_VLCausalLMOutputWithPast'")

    monkeypatch.setattr(liger, "apply_liger_kernel_to_qwen2_5_vl", broken)
    before = modeling.Qwen2MLP
    with pytest.warns(UserWarning, match=r"liger-kernel does not fit this transformers \(cannot import name"):
        models.patch_with_liger(torch.device("cuda"))
    assert modeling.Qwen2MLP is before

"""The GRPO family beyond the clipped token ratio (CISPO, GSPO, high-entropy tokens) in the fused loss,
each against a plain float64 autograd reference from full logits; DAPO's overlong rules in the step.

The loss's tests are marked `device`: `LMMR1_TEST_DEVICE=cuda` runs them on a GPU, compiled Triton, each
objective also at LMM-R1's size (bench/gpu_check.py does this, as for tests/test_kernels.py)."""
import pytest
import torch

from conftest import Draws
from lmmr1_kernels import grpo_loss
from test_kernels import (BACKENDS, REAL_VOCAB_SHAPES, TOLERANCE, make_inputs, reference_aggregate, reference_logprobs,
                          rel_err)

LOSS_AGGS = ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
# (loss_type, importance_sampling_level, top_entropy_quantile)
OBJECTIVES = [("cispo", "token", 1.0), ("grpo", "sequence", 1.0), ("cispo", "sequence", 1.0),
              ("grpo", "token", 0.5), ("grpo", "sequence", 0.3)]


def reference_objective(hidden, weight, targets, mask, adv, old, ref, beta, eps_low, eps_high, temperature,
                        loss_agg, loss_type, level, quantile, logits_dtype=None):
    """TRL's GRPOTrainer loss, written out in float64 from the full logits (autograd does the gradient).
    `logits_dtype`: the logits rounded to it first, as a GEMM in that dtype writes them (the kernels' bf16 path)."""
    logits = hidden.double() @ weight.double().t()
    if logits_dtype is not None:
        logits = logits + (logits.detach().to(logits_dtype).double() - logits.detach())  # the gradient stays exact
    logp_all = torch.log_softmax(logits / temperature, -1)
    logp = logp_all.gather(-1, targets[..., None]).squeeze(-1)  # [B, T]
    entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
    m = mask.double()
    old = logp.detach() if old is None else old.double()
    log_iw = logp - old
    if level == "sequence":
        log_iw = (log_iw * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1)  # [B, 1]
    coef = torch.exp(log_iw)
    a = adv.double()[:, None]
    if loss_type == "cispo":
        pg = -torch.clamp(coef, max=1 + eps_high).detach() * a * logp
        low, high = torch.zeros_like(coef, dtype=torch.bool), (coef > 1 + eps_high) & (a > 0)
    else:
        pg = -torch.min(coef * a, torch.clamp(coef, 1 - eps_low, 1 + eps_high) * a)
        low, high = (coef < 1 - eps_low) & (a < 0), (coef > 1 + eps_high) & (a > 0)
    if quantile < 1.0:
        threshold = torch.quantile(entropy[mask.bool()], 1 - quantile)
        pg = pg * ((entropy >= threshold) & mask.bool()).double()
    kl = torch.exp(ref.double() - logp) - (ref.double() - logp) - 1 if beta else torch.zeros_like(logp)
    loss = reference_aggregate(pg + beta * kl, m, loss_agg)  # pg broadcast from [B, 1] at sequence level
    n = m.sum()
    full = lambda x: x.expand_as(logp).double()  # noqa: E731
    metrics = {"kl": (kl * m).sum() / n, "ratio": (full(coef) * m).sum() / n, "entropy": (entropy * m).sum() / n,
               "clip_low": (full(low) * m).sum() / n, "clip_high": (full(high) * m).sum() / n}
    return loss, metrics


def uneven_batch(seed=1, B=4, T=6, H=16, V=333, weight_grad=True):
    """Completions of lengths 0 (all padding), T, 3 and 5: a prefix mask, as a rollout's."""
    hidden, weight, targets = make_inputs(B, T, H, V, torch.float32, seed=seed, weight_grad=weight_grad)
    lengths = torch.tensor([0, T, 3, 5])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    return hidden, weight, targets, mask


@pytest.mark.device
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_agg", LOSS_AGGS)
@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: "-".join(map(str, o)))
@pytest.mark.parametrize("num_iterations", [1, 2])
def test_objectives_match_float64(backend, loss_agg, objective, num_iterations):
    loss_type, level, quantile = objective
    # the LM head trains in half the cases: the second-pass path; else the rescaled d logp / d hidden path
    weight_grad = (LOSS_AGGS.index(loss_agg) + num_iterations) % 2 == 0
    hidden, weight, targets, mask = uneven_batch(weight_grad=weight_grad)
    g = Draws(2)
    adv = torch.tensor([0.5, 1.2, 1.0, -0.3])
    with torch.no_grad():
        base = reference_logprobs(hidden, weight, targets, 0.9).float()
    # num_iterations 2: old log-probs from an earlier policy, far enough apart that clipping is active
    old = base + g.randn(base.shape) * 0.5 if num_iterations == 2 else None
    ref = base + g.randn(base.shape) * 0.3
    # GSPO clips the mean log-ratio, so tighter bounds (the paper's are ~3e-4) to reach its clipped branch
    eps_low, eps_high = (0.2, 0.28) if level == "token" else (0.05, 0.2)
    kwargs = dict(beta=0.04, epsilon_low=eps_low, epsilon_high=eps_high, temperature=0.9, loss_agg=loss_agg)
    loss, metrics = grpo_loss(hidden, weight, targets, mask, adv, old, ref, loss_type=loss_type,
                              importance_sampling_level=level, top_entropy_quantile=quantile, backend=backend,
                              chunk_rows=5, **kwargs)  # chunks of 5 rows cut across the sequences of 6
    h64 = hidden.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    ref_loss, ref_metrics = reference_objective(h64, w64, targets, mask, adv, old, ref, 0.04, eps_low, eps_high, 0.9,
                                                loss_agg, loss_type, level, quantile)
    assert rel_err(loss, ref_loss) < 1e-5
    for key, value in ref_metrics.items():
        assert abs(metrics[key].item() - value.item()) < 1e-4 * max(1.0, abs(value.item())), key
    loss.backward()
    ref_loss.backward()
    assert rel_err(hidden.grad, h64.grad) < 1e-4
    assert hidden.grad[0].abs().sum() == 0, "a fully masked row gets no gradient"
    assert (hidden.grad[2, 3:] == 0).all(), "padding after a completion gets no gradient"
    if weight_grad:
        assert rel_err(weight.grad, w64.grad) < 1e-4
    else:
        assert weight.grad is None
    if num_iterations == 2:
        assert ref_metrics["clip_high"] > 0, "the test must exercise the clipped branch"
        if loss_type == "grpo":
            assert ref_metrics["clip_low"] > 0, "the test must exercise the lower clip"


# each objective in fp32 and bf16 at a small shape; on a GPU also at LMM-R1's size (Qwen's vocabulary, the 3B's
# hidden size, 1,024 tokens: tests/test_kernels.py's GPU-only real-vocabulary shape)
SCALE_SHAPES = [(2, 16, 32, 1000)] + REAL_VOCAB_SHAPES[1:]


@pytest.mark.device
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("shape", SCALE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("objective", OBJECTIVES, ids=lambda o: "-".join(map(str, o)))
def test_each_objective_at_scale(backend, dtype, shape, objective):
    """Forward and backward with old and reference log-probs (beta > 0), a frozen head (LoRA) and completions
    of uneven length, against the float64 reference at the dtype's tolerance (tests/test_kernels.py's), from the
    logits the kernels' GEMM writes (rounded to `dtype`): the high-entropy selection is discontinuous, and from
    unrounded logits a bf16 run picks other tokens near the threshold (measured on this CPU at 2 x 512 tokens,
    V = 32,000, torch path: hidden-gradient error 0.135 unrounded, 2.8e-3 rounded; the loss 3.9e-3 and 8e-8)."""
    loss_type, level, quantile = objective
    B, T, H, V = shape
    hidden, weight, targets = make_inputs(B, T, H, V, dtype, seed=11, weight_grad=False)
    g = Draws(12)
    lengths = torch.tensor([T, 3 * T // 4])[:B]
    mask = (torch.arange(T)[None] < lengths[:, None]).long()
    adv = g.randn(B)
    with torch.no_grad():
        base = reference_logprobs(hidden, weight, targets, 1.0).float()
    old, ref = base + 0.3 * g.randn(B, T), base + 0.3 * g.randn(B, T)
    loss, metrics = grpo_loss(hidden, weight, targets, mask, adv, old, ref, beta=0.04, loss_type=loss_type,
                              importance_sampling_level=level, top_entropy_quantile=quantile, backend=backend)
    h64 = hidden.detach().double().requires_grad_()
    ref_loss, ref_metrics = reference_objective(h64, weight.detach().double(), targets, mask, adv, old, ref, 0.04, 0.2,
                                                0.2, 1.0, "token_mean", loss_type, level, quantile, logits_dtype=dtype)
    assert rel_err(loss, ref_loss) < TOLERANCE[dtype]
    assert abs(metrics["entropy"].item() - ref_metrics["entropy"].item()) < TOLERANCE[dtype] * ref_metrics[
        "entropy"].item()
    loss.backward()
    ref_loss.backward()
    assert hidden.grad.dtype == dtype and rel_err(hidden.grad, h64.grad) < TOLERANCE[dtype] * 10
    if B > 1:
        assert (hidden.grad[1, 3 * T // 4:] == 0).all(), "padding gets no gradient"


@pytest.mark.device
def test_gspo_equals_grpo_for_one_token_sequences_and_is_per_sequence():
    """A one-token completion's sequence ratio is its token ratio; every token of a sequence shares its clip."""
    hidden, weight, targets = make_inputs(3, 1, 16, 200, torch.float32, seed=3)
    mask, adv = torch.ones(3, 1), torch.tensor([1.0, -1.0, 0.5])
    old = reference_logprobs(hidden, weight, targets, 1.0).float().detach() + torch.tensor([[-0.5], [0.4], [0.1]])
    out = {}
    for level in ("token", "sequence"):
        h = hidden.detach().clone().requires_grad_()
        loss, metrics = grpo_loss(h, weight.detach(), targets, mask, adv, old, importance_sampling_level=level,
                                  backend="torch")
        loss.backward()
        out[level] = (loss, h.grad, metrics["clip_high"], metrics["clip_low"])
    for a, b in zip(out["token"], out["sequence"]):
        torch.testing.assert_close(a, b)
    assert out["token"][2] > 0 and out["token"][3] > 0


@pytest.mark.device
def test_top_entropy_quantile_zero_keeps_only_the_highest_entropy_token():
    hidden, weight, targets, mask = uneven_batch(seed=5, weight_grad=False)
    adv = torch.tensor([0.0, 1.0, 1.0, 1.0])
    with torch.no_grad():
        logp_all = torch.log_softmax(hidden.double() @ weight.double().t(), -1)
        entropy = -(logp_all.exp() * logp_all).sum(-1).masked_fill(mask == 0, -1.0)
    top = entropy.flatten().argmax()
    loss, _ = grpo_loss(hidden, weight, targets, mask, adv, top_entropy_quantile=0.0, backend="torch")
    loss.backward()
    nonzero = hidden.grad.reshape(-1, hidden.shape[-1]).abs().sum(-1) > 0
    assert nonzero.nonzero().flatten().tolist() == [top.item()]
    assert loss.item() == pytest.approx(-1.0 / mask.sum().item(), rel=1e-6), "one token of A=1, ratio 1, token_mean"


@pytest.mark.device
def test_objective_arguments_are_checked():
    hidden, weight, targets, mask = uneven_batch()
    adv = torch.zeros(4)
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(hidden, weight, targets, mask, adv, loss_type="gspo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        grpo_loss(hidden, weight, targets, mask, adv, importance_sampling_level="group")
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        grpo_loss(hidden, weight, targets, mask, adv, top_entropy_quantile=1.5)


# ---- DAPO's overlong rules: the soft punishment (a reward) and overlong filtering (the loss mask) ----------
def test_soft_overlong_punishment_by_hand():
    from lmmr1_lite.rewards import soft_overlong_punishment
    # max 10 tokens, L_cache 4: 0 up to 6 tokens, then (6 - n) / 4 down to -1 at 10, -1 beyond
    assert soft_overlong_punishment([1, 6, 7, 8, 9, 10, 11], 10, 4) == [0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0]


def test_soft_overlong_is_a_reward_a_yaml_rewards_dict_can_weight(tmp_path, capsys):
    from lmmr1_lite import rewards
    from lmmr1_lite.cli import main
    from lmmr1_lite.config import resolve_config
    from lmmr1_lite.data import Example

    config = tmp_path / "c.yaml"
    config.write_text("rewards: {format: 0.5, soft_overlong: 2.0}\nmax_new_tokens: 12\nsoft_punish_cache: 4\n")
    cfg = resolve_config(None, str(config))
    assert cfg.rewards == {"format": 0.5, "soft_overlong": 2.0} and cfg.soft_punish_cache == 4
    rows = [Example(prompt="q", answer="1") for _ in range(3)]
    totals, parts, counts = rewards.score(["a", "b", "c"], rows, cfg.rewards, completion_lengths=[3, 10, 12],
                                          max_completion_len=cfg.max_new_tokens,
                                          soft_punish_cache=cfg.soft_punish_cache)
    assert parts["soft_overlong"] == [0.0, -0.5, -1.0] and totals == [0.0, -1.0, -2.0]
    assert counts["reward_errors"] == 0
    # an L_cache longer than the cap cannot go with the cap: one line, exit 2
    code = main(["train", "--config", str(config), "--set", "soft_punish_cache=20", "--output-dir",
                 str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "soft_punish_cache (20) must not exceed max_new_tokens (12)" in err


def tiny_scored(tokenizer, n=6, prompt=5, completion=7, seed=0):
    """A hand-made rollout of `n` rows (three groups of 2) for the tiny model, lengths uneven; rows 1 and 4
    hit the cap without a stop (`clipped`)."""
    from lmmr1_lite.rollout import Rollout
    from lmmr1_lite.step import ScoredRollout

    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([3, completion, 2, 5, completion, 6])[:n]
    prompt_ids = torch.randint(3, 60, (n, prompt), generator=gen)
    batch = Rollout(prompt_ids, torch.ones(n, prompt, dtype=torch.long), torch.randint(3, 60, (n, completion), generator=gen),
                    (torch.arange(completion)[None] < lengths[:, None]).long(), [""] * n, [None] * n,
                    clipped=torch.tensor([False, True, False, False, True, False])[:n])
    return ScoredRollout(batch, [None] * n, torch.zeros(n), {}, {}, torch.randn(n, generator=gen), None, None)


def test_the_step_scores_soft_overlong_from_each_completions_token_count(tiny_cfg):
    from lmmr1_lite import models
    from lmmr1_lite.data import Example
    from lmmr1_lite.step import StepContext, reward_rollouts

    cfg = tiny_cfg(rewards={"soft_overlong": 1.0}, num_generations=2, max_new_tokens=7, soft_punish_cache=4)
    tokenizer = models.load_tokenizer(cfg.model)
    batch = tiny_scored(tokenizer).batch  # completion lengths 3, 7, 2, 5, 7, 6 (stop tokens included)
    scored = reward_rollouts(StepContext(None, tokenizer, cfg), batch, [Example(prompt="q", answer="1")] * 3)
    assert scored.rewards.tolist() == [0.0, -1.0, 0.0, -0.5, -1.0, -0.75]


def lora_grads(policy) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in policy.parameters() if p.requires_grad])


def recorded_passes(monkeypatch) -> list[tuple[int, int]]:
    """`(rows, width)` of every micro-batch the passes run from now on (`models.completion_hidden` recorded)."""
    from lmmr1_lite import models

    shapes, real = [], models.completion_hidden

    def recording(policy, micro, share):
        shapes.append(tuple(micro.completion_ids.shape))
        return real(policy, micro, share)
    monkeypatch.setattr(models, "completion_hidden", recording)
    return shapes


def test_mask_truncated_completions_drops_the_truncated_rows_from_the_loss(tiny_policy):
    """Overlong filtering's gradient is the gradient of the batch without its truncated completions (token_mean:
    the denominator counts only the kept tokens); without it they count."""
    from dataclasses import replace

    from lmmr1_lite.rollout import Rollout
    from lmmr1_lite.step import ScoredRollout, StepContext, compute_gradients, loss_mask

    policy, tokenizer, cfg = tiny_policy
    cfg = replace(cfg, micro_batch_size=4, max_tokens_per_micro_batch=0, beta=0.0, loss_agg="token_mean")
    scored = tiny_scored(tokenizer)
    keep = [0, 2, 3, 5]
    mask = loss_mask(replace(cfg, mask_truncated_completions=True), scored.batch)
    assert mask[[1, 4]].sum() == 0 and torch.equal(mask[keep], scored.batch.completion_mask[keep])
    filtered = compute_gradients(StepContext(policy, tokenizer, replace(cfg, mask_truncated_completions=True)), scored)
    got = lora_grads(policy)
    b = scored.batch  # the same batch without rows 1 and 4 (Rollout.rows takes slices)
    sub = Rollout(b.prompt_ids[keep], b.prompt_mask[keep], b.completion_ids[keep], b.completion_mask[keep],
                  [""] * 4, [None] * 4, clipped=b.clipped[keep])
    expected = compute_gradients(StepContext(policy, tokenizer, cfg),
                                 ScoredRollout(sub, [None] * 4, torch.zeros(4), {}, {}, scored.advantages[keep], None,
                                               None))
    want = lora_grads(policy)
    assert want.norm() > 0 and float((got - want).norm() / want.norm()) < 1e-5
    assert abs(float(filtered["loss"] - expected["loss"])) < 1e-6
    compute_gradients(StepContext(policy, tokenizer, cfg), scored)
    assert float((lora_grads(policy) - want).norm() / want.norm()) > 1e-3, "unfiltered, the truncated rows count"


@pytest.mark.parametrize("objective", [dict(loss_agg="token_mean"), dict(loss_agg="seq_mean_token_sum_norm"),
                                       dict(importance_sampling_level="sequence", beta=0.05)], ids=str)
def test_micro_batches_cut_to_their_own_longest_completion_change_nothing(tiny_policy, monkeypatch, objective):
    """Each micro-batch computes only up to its own longest completion (widths 7, 5, 3 here instead of 7 each),
    and the loss, the LoRA gradients and the log-probs equal those of the uncut micro-batches."""
    from dataclasses import replace

    from lmmr1_lite import step
    from lmmr1_lite.step import StepContext, compute_gradients, micro_batches, policy_logprobs

    policy, tokenizer, cfg = tiny_policy
    cfg = replace(cfg, micro_batch_size=2, max_tokens_per_micro_batch=0, **{"beta": 0.0, **objective})
    scored = tiny_scored(tokenizer)
    lengths = torch.tensor([3, 7, 2, 5, 2, 3])
    scored.batch.completion_mask = (torch.arange(7)[None] < lengths[:, None]).long()
    scored.ref_logp = -torch.rand(6, 7, generator=torch.Generator().manual_seed(3)) if cfg.beta else None
    assert [width for _, width in micro_batches(scored.batch, 2)] == [7, 5, 3]
    passes = recorded_passes(monkeypatch)
    ctx = StepContext(policy, tokenizer, cfg)
    ctx.logprob_batch_size = 2  # the no-grad pass too, in micro-batches of 2
    cut_sums, cut_grads, cut_logp = compute_gradients(ctx, scored), lora_grads(policy), policy_logprobs(ctx, scored.batch)
    assert [width for _, width in passes] == [7, 5, 3, 7, 5, 3], "the training pass, then the log-prob pass"
    cut_to_own = step.micro_batches  # now every micro-batch at the batch's width:
    monkeypatch.setattr(step, "micro_batches", lambda batch, size: ((rows, 7) for rows, _ in cut_to_own(batch, size)))
    full_sums, full_grads, full_logp = compute_gradients(ctx, scored), lora_grads(policy), policy_logprobs(ctx, scored.batch)
    assert [width for _, width in passes[6:]] == [7] * 6
    assert full_grads.norm() > 0 and float((cut_grads - full_grads).norm() / full_grads.norm()) < 1e-5
    assert abs(float(cut_sums["loss"] - full_sums["loss"])) < 1e-6
    real_tokens = scored.batch.completion_mask.bool()
    assert torch.allclose(cut_logp[real_tokens], full_logp[real_tokens], atol=1e-5)
    assert cut_logp.shape == full_logp.shape and not cut_logp[2:4, 5:].any() and not cut_logp[4:, 3:].any()


@pytest.mark.parametrize("objective", [dict(loss_agg="token_mean"), dict(loss_agg="seq_mean_token_mean"),
                                       dict(loss_type="cispo"), dict(importance_sampling_level="sequence")], ids=str)
def test_rows_without_advantage_skip_the_training_pass_and_change_nothing(tiny_policy, monkeypatch, objective):
    """Without a KL term the rows of a group whose rewards tie (advantage 0) carry no loss: the training pass
    runs on the other rows only, and the loss and LoRA gradients equal the pass over every row; with a KL term
    (beta > 0) every row runs; when no row carries loss one row still runs and the gradient is zero."""
    from dataclasses import replace

    from lmmr1_lite import step
    from lmmr1_lite.step import StepContext, compute_gradients

    policy, tokenizer, cfg = tiny_policy
    cfg = replace(cfg, micro_batch_size=4, max_tokens_per_micro_batch=0, beta=0.0, **objective)
    scored = tiny_scored(tokenizer)
    scored.advantages[2:4] = 0.0  # the middle group's rewards tie
    passes = recorded_passes(monkeypatch)
    ctx = StepContext(policy, tokenizer, cfg)
    skipped_sums, skipped_grads = compute_gradients(ctx, scored), lora_grads(policy)
    assert [rows for rows, _ in passes] == [4], "rows 0, 1, 4, 5 in one micro-batch of 4"
    every_row = lambda cfg, advantages: torch.arange(advantages.shape[0])  # noqa: E731
    monkeypatch.setattr(step, "rows_with_loss", every_row)
    all_sums, all_grads = compute_gradients(ctx, scored), lora_grads(policy)
    assert [rows for rows, _ in passes[1:]] == [4, 2]
    assert all_grads.norm() > 0 and float((skipped_grads - all_grads).norm() / all_grads.norm()) < 1e-5
    assert abs(float(skipped_sums["loss"] - all_sums["loss"])) < 1e-6
    monkeypatch.undo()
    passes = recorded_passes(monkeypatch)
    compute_gradients(StepContext(policy, tokenizer, replace(cfg, beta=0.05)), scored)
    assert [rows for rows, _ in passes] == [4, 2], "a KL term: every row has a gradient"
    scored.advantages[:] = 0.0
    del passes[:]
    sums = compute_gradients(ctx, scored)
    assert [rows for rows, _ in passes] == [1] and float(sums["loss"]) == 0.0 and not lora_grads(policy).any()


def test_the_old_log_prob_pass_runs_only_on_rows_that_train(tiny_policy, monkeypatch):
    """num_iterations > 1 without a KL term: the old log-probs of a tied group's rows are never read, so their
    no-grad pass skips them; the other rows' old log-probs equal the pass over every row."""
    from dataclasses import replace

    from lmmr1_lite.step import StepContext, add_logprobs, policy_logprobs

    policy, tokenizer, cfg = tiny_policy
    ctx = StepContext(policy, tokenizer, replace(cfg, num_iterations=2, beta=0.0, max_tokens_per_micro_batch=0))
    scored = tiny_scored(tokenizer)
    scored.advantages[2:4] = 0.0
    passes = recorded_passes(monkeypatch)
    old = add_logprobs(ctx, scored).old_logp
    assert [rows for rows, _ in passes] == [4]
    every = policy_logprobs(ctx, scored.batch)
    kept = [0, 1, 4, 5]
    assert torch.allclose(old[kept], every[kept], atol=1e-6) and not old[2:4].any()


# ---- dynamic sampling ----------------------------------------------------------------------------------------
def fake_generation(monkeypatch, tokenizer, completion=4):
    """`generate_rollouts` replaced by G fixed-length rows per example whose text is `<answer>-<row>`."""
    from lmmr1_lite import step
    from lmmr1_lite.rollout import Rollout

    calls = []

    def generate(ctx, examples):
        calls.append([e.answer for e in examples])
        n = len(examples) * ctx.cfg.num_generations
        texts = [f"{e.answer}-{i}" for e in examples for i in range(ctx.cfg.num_generations)]
        return Rollout(torch.full((n, 2), 5), torch.ones(n, 2, dtype=torch.long), torch.full((n, completion), 7),
                       torch.ones(n, completion, dtype=torch.long), texts, [None] * n,
                       clipped=torch.zeros(n, dtype=torch.bool))
    monkeypatch.setattr(step, "generate_rollouts", generate)
    return calls


@pytest.fixture
def signal_reward():
    """A reward that varies within a group only for examples whose answer starts with 's'."""
    from lmmr1_lite import rewards

    @rewards.reward("signal_test")
    def signal(completions, examples):
        return [float(c.endswith("-0")) if e.answer.startswith("s") else 0.5 for c, e in zip(completions, examples)]
    yield
    rewards.REWARDS.pop("signal_test")


def test_dynamic_sampling_draws_until_the_batch_is_full(monkeypatch, tiny_cfg, signal_reward):
    from lmmr1_lite import models
    from lmmr1_lite.data import Example
    from lmmr1_lite.step import StepContext, filtered_rollouts

    cfg = tiny_cfg(rewards={"signal_test": 1.0}, num_generations=2, filter_groups=True, max_num_gen_batches=5)
    tokenizer = models.load_tokenizer(cfg.model)
    calls = fake_generation(monkeypatch, tokenizer)
    rounds = iter([["s2", "f3"], ["s4", "s5"]])
    draw = lambda: [Example(prompt="q", answer=a) for a in next(rounds)]  # noqa: E731
    ctx = StepContext(None, tokenizer, cfg)
    scored, stats = filtered_rollouts(ctx, [Example(prompt="q", answer=a) for a in ("s0", "f1")], draw)
    assert calls == [["s0", "f1"], ["s2", "f3"]], "drawing stops once two groups with a signal are kept"
    assert [e.answer for e in scored.examples] == ["s0", "s0", "s2", "s2"]
    assert scored.rewards.tolist() == [1.0, 0.0, 1.0, 0.0] and scored.advantages.abs().min() > 0
    assert scored.batch.texts == ["s0-0", "s0-1", "s2-0", "s2-1"] and scored.parts["signal_test"] == [1, 0, 1, 0]
    assert stats == {"dynamic_sampling/groups_dropped": 2, "dynamic_sampling/prompts_drawn": 4,
                     "dynamic_sampling/groups_short": 0, "num_gen_batches": 2}


def test_dynamic_sampling_ends_at_its_bound_when_no_group_has_a_signal(monkeypatch, tiny_cfg, signal_reward):
    """Every group's rewards equal: never a hang; after max_num_gen_batches rounds the step trains on a full
    batch of dropped groups (advantage 0) and says so in its counts."""
    from lmmr1_lite import models
    from lmmr1_lite.data import Example
    from lmmr1_lite.step import StepContext, filtered_rollouts

    cfg = tiny_cfg(rewards={"signal_test": 1.0}, num_generations=2, filter_groups=True, max_num_gen_batches=3)
    tokenizer = models.load_tokenizer(cfg.model)
    calls = fake_generation(monkeypatch, tokenizer)
    draws = []

    def draw():
        draws.append(1)
        return [Example(prompt="q", answer=f"f{len(draws)}{i}") for i in range(3)]
    scored, stats = filtered_rollouts(StepContext(None, tokenizer, cfg),
                                      [Example(prompt="q", answer=f"f0{i}") for i in range(3)], draw)
    assert len(calls) == 3 and len(draws) == 2
    assert stats == {"dynamic_sampling/groups_dropped": 9, "dynamic_sampling/prompts_drawn": 9,
                     "dynamic_sampling/groups_short": 3, "num_gen_batches": 3}
    assert len(scored.examples) == 6 and (scored.advantages == 0).all()


@pytest.fixture
def constant_reward():
    from lmmr1_lite import rewards

    rewards.reward("constant_test")(lambda completions, examples: [1.0] * len(completions))
    yield
    rewards.REWARDS.pop("constant_test")


def test_a_run_whose_groups_all_tie_ends_each_step_at_the_bound_and_logs_it(tmp_path, constant_reward):
    """The whole loop (with every new objective on): every group ties, so each step draws max_num_gen_batches
    rounds, trains on a full batch of dropped groups, and its metrics row says so."""
    import json

    from lmmr1_lite.cli import main

    out = tmp_path / "run"
    code = main(["train", "--output-dir", str(out), "--max-steps", "1", "--eval-size", "0", "--prompts-per-step", "2",
                 "--num-generations", "2", "--max-new-tokens", "6", "--set", "instruct_prior_steps=0",
                 "--set", "rewards={constant_test: 1.0}", "--set", "filter_groups=true",
                 "--set", "max_num_gen_batches=3", "--set", "loss_type=cispo",
                 "--set", "importance_sampling_level=sequence", "--set", "mask_truncated_completions=true",
                 "--set", "top_entropy_quantile=0.5"])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    for row in rows:
        assert (row["num_gen_batches"], row["dynamic_sampling/prompts_drawn"], row["dynamic_sampling/groups_dropped"],
                row["dynamic_sampling/groups_short"]) == (3, 6, 6, 2)
        assert row["reward_std"] == 0 and "cispo_clip_ratio" in row and "clip_ratio/high_mean" not in row

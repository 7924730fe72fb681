"""The one config object: every knob of a run, with its default and help text.

Precedence, lowest first: the defaults below (sized for Qwen2.5-VL-3B on one 24 GB card),
the stage's tiny YAML when neither `--config` nor `--model` is given, the `--config` YAML,
then command-line flags (`--field-name value` or `--set field=value`). YAML files hold
overrides only; the resolved config is written to `<output_dir>/config.yaml`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
TINY_MODEL_DIR = CONFIG_DIR / "models" / "tiny"  # the embedded tiny model (config + tokenizer)
STAGES = ("fre", "mgt")
DATA_PRESETS = ("auto", "plain", "lmmr1", "deepscaler", "vermulti", "vermulti_geo", "sokoban", "gsm8k")  # data.PRESETS' names


LMM_R1_SYSTEM_PROMPT = (
    "You are a helpful assistant. Solve the problem step by step. Put your reasoning inside <think> </think> "
    "and your final answer, in LaTeX between $ signs, inside <answer> </answer>: the response must start with "
    "<think> and end with </answer>. Example: <think> Since $1+1=2$, so the answer is $2$. </think>"
    "<answer> $2$ </answer>")


class ConfigError(ValueError):
    """A user-fixable problem with the config; the CLI prints it as one line."""


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # --- run -----------------------------------------------------------------------------------
    stage: str = _f("fre", "Training stage: 'fre' (text-only math) or 'mgt' (image + text).")
    output_dir: str | None = _f(None, "Run directory. Default: runs/<stage>-<timestamp>.")
    seed: int = _f(0, "Seed for sampling, data order and (with random_init) the model's weights.")
    max_steps: int = _f(150, "GRPO steps (one rollout batch each). LMM-R1's stages run ~100-175 steps.")
    save_every: int = _f(50, "Save the adapter every N steps (and always at the end). 0: only at the end.")
    keep_last: int = _f(2, "Complete checkpoints kept (older ones are deleted after each save); 0 keeps all.")
    overwrite: bool = _f(False, "Replace a run already in output_dir (otherwise refused, nothing touched).")
    max_consecutive_skips: int = _f(5, "Abort after this many consecutive steps with a non-finite loss or gradient.")
    dist_backend: str = _f("auto", "Process-group backend under torchrun: 'auto' (nccl on CUDA, gloo on CPU), 'nccl' "
                           "or 'gloo'.")
    dist_timeout: float = _f(600.0, "Seconds a collective may wait under torchrun before the run ends with one line; "
                             "raise it if one rank can lag the others by longer (very long generations).")
    report_to: str = _f("none", "Also log metrics to 'tensorboard', 'wandb' or 'trackio' (when installed), or 'none'.")
    run_name: str | None = _f(None, "Name of the run in wandb/trackio/tensorboard. Default: the run directory's name.")
    log_completions_every: int = _f(10, "Every N steps, append the step's prompts, completions and reward parts to "
                                    "completions.jsonl (0: never).")
    eval_size: int = _f(64, "Held-out prompts decoded greedily before and after training (0: skip).")
    # --- model ---------------------------------------------------------------------------------
    model: str = _f("Qwen/Qwen2.5-VL-3B-Instruct",
                    "Model directory or Hub id (Qwen2.5-VL class), loaded with from_pretrained.")
    init: str | None = _f(None, "An FRE run directory or adapter whose LoRA weights this run continues. Default for "
                          "stage mgt: the newest runs/fre-*; 'none': start from the base model.")
    random_init: bool = _f(False, "Build the architecture from the model's config.json with random weights.")
    instruct_prior_steps: int = _f(0, "random_init only: supervised steps that stand in for instruction tuning before RL. "
                                   "The random model learns to reply <think></think><answer>W</answer> with W drawn at "
                                   "random from the training rows' answers, whatever the prompt: it answers in form, at "
                                   "chance, and RL must learn which answer is right. 0: none (RL must find the format).")
    trust_remote_code: bool = _f(False, "Allow a model repository's own Python code to run (off: never by default).")
    tokenizer: str | None = _f(None, "Tokenizer directory or Hub id. Default: the model's own; an architecture-only "
                               "directory (random_init, no tokenizer files) falls back to the tiny tokenizer.")
    dtype: str = _f("auto", "Weights dtype: 'auto' (bf16 on CUDA, fp32 on CPU), 'bfloat16', 'float32'.")
    quantization: str = _f("nf4", "The language model's linear layers: 'nf4' (4-bit, double quantisation), 'int8' "
                           "or 'none'. The vision tower, embeddings and LM head stay in `dtype`.")
    optim: str = _f("adamw_torch", "Optimizer of the LoRA parameters: 'adamw_torch' or 'paged_adamw_8bit' (bitsandbytes).")
    gradient_checkpointing: bool = _f(True, "Non-reentrant gradient checkpointing in the training pass only.")
    lora_r: int = _f(64, "LoRA rank (1 to 8,192).")
    lora_alpha: int = _f(128, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = _f(0.0, "LoRA dropout. 0 keeps the rollout and training policies identical.")
    lora_target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                   "Linear layers of the language model that get LoRA adapters.")
    # --- data and prompt -----------------------------------------------------------------------
    data: str = _f("tiny_max", "A generated task (see `lmmr1_lite.tasks.TASKS`), a JSONL/JSON/parquet file, a folder of "
                   "them, a save_to_disk dataset, or a Hugging Face Hub dataset id org/name.")
    train_size: int = _f(2000, "Rows generated for a task's train split (ignored for files).")
    task_level: int = _f(1, "Difficulty of a generated task, 1-3 (operand sizes, steps; ignored for files).")
    data_preset: str = _f("auto", "Row format and field names of `data`: 'auto' (a row with 'message' is LMM-R1, "
                          "else prompt/answer/images), 'plain', 'lmmr1', or a preset for the paper's sets: "
                          "'deepscaler' (FRE-Text, DeepScaleR-Preview: problem/answer), 'vermulti' and "
                          "'vermulti_geo' (MGT: LMM-R1 message/answer rows with images), 'sokoban' (LMM-R1 "
                          "message rows whose env_path names the level), 'gsm8k' (openai/gsm8k: question, answer ending in "#### N"; "
                          "the gold is N). prompt_field etc. override its fields.")
    data_split: str = _f("train", "Split to read from a Hub dataset, a save_to_disk DatasetDict, or a folder whose "
                         "data files are named by split (train.jsonl, train-00000-of-00001.parquet).")
    data_config: str | None = _f(None, "Hub dataset configuration (load_dataset's `name`), when it has several.")
    prompt_field: str | None = _f(None, "Plain rows: the key holding the prompt text (OpenRLHF's input_key). "
                                  "Default: the preset's ('problem' for deepscaler), else 'prompt'.")
    answer_field: str | None = _f(None, "The key holding the gold answer (OpenRLHF's label_key). Default: 'answer'.")
    image_field: str | None = _f(None, "Plain rows: the key holding an image or a list of images (paths, file:// or "
                                 "data: URIs, or Hugging Face Image values). Default: 'images'.")
    system_prompt: str = _f(LMM_R1_SYSTEM_PROMPT, "System prompt of every prompt ('' for none); a row's own "
                            "system turn (LMM-R1 JSONL) wins. Default: LMM-R1's instructions (paraphrased).")
    prompt_template: str = _f("{prompt}", "How the user turn wraps a row's prompt text; must contain {prompt}.")
    max_prompt_tokens: int = _f(4096, "Prompts longer than this (image tokens included) are skipped and counted, "
                                "never truncated.")
    on_bad_row: str = _f("error", "A bad data row: 'error' stops with its file, row and field; 'skip' counts it.")
    min_pixels: int = _f(4 * 28 * 28, "Images smaller than this (width x height) are upscaled (LMM-R1: 4*28^2).")
    max_pixels: int = _f(1280 * 28 * 28, "Images larger than this are downscaled (LMM-R1 allows 16,384*28^2; "
                         "1,280*28^2 keeps a step within 24 GB).")
    # --- rollout -------------------------------------------------------------------------------
    prompts_per_step: int = _f(8, "B: prompts sampled per step.")
    num_generations: int = _f(8, "G: completions sampled per prompt (the group).")
    max_new_tokens: int = _f(1024, "Completion length cap (LMM-R1 uses 4,096-8,192; 1,024 fits 24 GB).")
    temperature: float = _f(1.0, "Sampling temperature for rollouts (also divides logits in the loss).")
    top_k: int = _f(0, "Sample only from the k most likely tokens (0: off, LMM-R1's setting).")
    top_p: float = _f(1.0, "Nucleus sampling: the smallest set of tokens holding this probability mass (1.0: off).")
    decode_cache: str = _f("dynamic", "KV cache of the rollout decode loop: 'dynamic' (finished rows leave the batch "
                           "and the cache), 'static' (preallocated, fixed shapes; finished rows stay, masked) or "
                           "'compiled' (static, and the decode step under torch.compile: CUDA graphs on CUDA, "
                           "where a small model's step is bound by kernel launches). Not yet measured on a GPU.")
    lora_autocast: bool = _f(True, "With a model computing in bf16 (its base bf16, or 4/8-bit with bf16 compute), "
                             "compute the LoRA side path of the rollouts, the training and the log-prob passes in "
                             "bf16 under autocast, its weights kept in fp32 for the optimizer (as TRL's bf16 "
                             "training does), instead of peft casting every layer's input to fp32 and its output "
                             "back (bench/RESULTS.md); the rollouts hold a bf16 copy of the LoRA weights while "
                             "generating. No effect on an fp32 model.")
    merge_for_rollouts: bool = _f(False, "Generate rollouts with the LoRA folded into a copy of the base's weights: no "
                                  "LoRA side path in every layer's decode step (on the 2-core CPU the real 0.5B model "
                                  "generates faster, bench/RESULTS.md). The sampling weights are rounded to `dtype`, "
                                  "as a vLLM-served policy's are; the update still computes the exact policy. Costs a "
                                  "copy of the adapted weights in `dtype` while generating (the planner counts it); a "
                                  "4/8-bit base generates from dense dequantised copies: no dequantisation and no "
                                  "side path per decode step. With decode_cache 'compiled' the copies are kept "
                                  "between steps (fixed addresses for its CUDA graphs), through training too.")
    stop_tokens: list = _f(["</answer>"], "Strings (besides EOS) that end a completion, one or several tokens each "
                           "(`</answer>` is three in Qwen's vocabulary); the completion keeps the stop string.")
    # --- rewards -------------------------------------------------------------------------------
    rewards: dict = _f({"format": 0.5, "accuracy": 1.0},
                       "Reward name -> weight; the total reward is the weighted sum (LMM-R1: 0.5 format + 1 acc). "
                       "Built in: format (LMM-R1 tags), format_boxed, accuracy, tags, sokoban, soft_overlong "
                       "(DAPO's length penalty, see soft_punish_cache; its weight is verl's penalty_factor).")
    soft_punish_cache: int = _f(256, "The `soft_overlong` reward (DAPO, arXiv:2503.14476; TRL's "
                                "get_soft_overlong_punishment, verl's overlong_buffer.len): L_cache, the last tokens "
                                "before max_new_tokens over which the reward falls linearly from 0 to -1.")
    reward_workers: int = _f(0, "Answer-checking worker processes (math-verify, forked from one warm template); "
                             "0: the cores this process may use, at most 8.")
    reward_timeout: float = _f(0.8, "Seconds one answer check may take before its worker is killed (scores 0); "
                               "0.8 keeps every reward call under 1 s with process overhead.")
    # --- GRPO ----------------------------------------------------------------------------------
    learning_rate: float = _f(2e-5, "AdamW learning rate for the LoRA parameters (LMM-R1 full FT: 4e-7 to 1e-6).")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    adam_beta1: float = _f(0.9, "AdamW beta1.")
    adam_beta2: float = _f(0.95, "AdamW beta2 (LMM-R1: 0.95).")
    warmup_ratio: float = _f(0.03, "Fraction of max_steps of linear warm-up before the schedule.")
    lr_scheduler_type: str = _f("cosine", "Learning-rate schedule after warm-up: 'cosine', 'linear' or 'constant'.")
    max_grad_norm: float = _f(1.0, "Gradient-norm clip (> 0).")
    beta: float = _f(0.001, "KL coefficient of the k3 term against the adapter-disabled reference (0: no ref pass).")
    epsilon_low: float = _f(0.2, "Lower clip range of the ratio (1 - eps_low).")
    epsilon_high: float = _f(0.2, "Upper clip range of the ratio (1 + eps_high); > eps_low is DAPO's clip-higher.")
    loss_agg: str = _f("token_mean", "Loss aggregation: token_mean (DAPO), seq_mean_token_mean (GRPO), "
                       "seq_mean_token_sum_norm (Dr. GRPO).")
    scale_rewards: str = _f("group", "Advantage = (r - group mean) / group std ('group') or r - group mean ('none').")
    loss_type: str = _f("grpo", "Policy-gradient objective (TRL's loss_type; the aggregation is loss_agg): 'grpo' "
                        "(clipped ratio, PPO-style) or 'cispo' (MiniMax-M1, arXiv:2506.13585: the importance weight "
                        "clipped at 1 + epsilon_high and detached, times the log-prob; every token keeps its "
                        "gradient. TRL's epsilon_high is the bound itself: its 5.0 is our 4.0).")
    importance_sampling_level: str = _f("token", "TRL's importance_sampling_level: 'token' (one ratio per token) or "
                                        "'sequence' (GSPO, arXiv:2507.18071: one ratio per completion, "
                                        "exp(mean_t(logp - old)), clipped per sequence).")
    top_entropy_quantile: float = _f(1.0, "TRL's top_entropy_quantile (arXiv:2506.01939, 'Beyond the 80/20 rule'): "
                                     "only the top q of completion tokens by entropy carry the policy-gradient term "
                                     "(the KL term stays on every token); the quantile is taken within each "
                                     "micro-batch, as TRL takes it within each per-device batch. 1.0: all tokens; "
                                     "the paper uses 0.2.")
    mask_truncated_completions: bool = _f(False, "DAPO's overlong filtering (TRL's mask_truncated_completions): "
                                          "completions that hit max_new_tokens without a stop carry no loss (they "
                                          "still count in their group's advantages).")
    filter_groups: bool = _f(False, "DAPO's dynamic sampling (verl's filter_groups, EasyR1's online_filtering): drop "
                             "groups whose rewards are all equal (no signal) and generate for more prompts until "
                             "prompts_per_step groups remain, at most max_num_gen_batches generation rounds a step; "
                             "a step still short then trains on its kept groups topped up with dropped ones.")
    max_num_gen_batches: int = _f(4, "filter_groups: generation rounds (prompts_per_step prompts each) a step may draw "
                                  "before it trains on what it has (verl's max_num_gen_batches; here always bounded).")
    num_iterations: int = _f(1, "Updates per rollout batch; > 1 computes old log-probs for the ratio.")
    micro_batch_size: int = _f(4, "Sequences per forward/backward in the log-prob and training passes "
                               "(halved automatically on CUDA out-of-memory).")
    max_tokens_per_micro_batch: int = _f(16384, "Token budget of one micro-batch (sequences x padded length) in the "
                                         "log-prob and training passes; caps micro_batch_size. 0: no budget.")
    share_prompt: bool = _f(True, "Compute each prompt once per group in the reference, old and training passes, "
                            "its G completions attending to its keys/values (gradients of all G flow into it); "
                            "false: every completion recomputes its prompt (same numbers, G times the prompt work).")
    generation_batch_size: int = _f(0, "Prompts per generate call (0: all of a step's prompts; halved on OOM).")
    logprob_chunk_bytes: int = _f(0, "Bytes of one fp32 [rows, vocab] logits chunk in the log-prob and loss kernels "
                                  "(0: the kernels' default, 256 MiB); larger chunks read the LM head fewer times.")
    logprob_backend: str = _f("auto", "Log-prob kernels: 'auto' (Triton on CUDA, torch on CPU), 'torch', 'triton'.")

    def __post_init__(self):
        """The one validation layer for values: finiteness, ranges, choices, non-empty lists."""
        for name, kind in field_types().items():
            value = getattr(self, name)
            if kind in (int, float) and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ConfigError(f"{name} must be a number, got {value!r}")
            if kind in (int, float) and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value!r}")
        checks = [
            (self.stage in STAGES, f"stage must be one of {STAGES}, got {self.stage!r}"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.instruct_prior_steps >= 0, "instruct_prior_steps must be >= 0"),
            (self.save_every >= 0, "save_every must be >= 0"),
            (self.eval_size >= 0, "eval_size must be >= 0 (0 skips the held-out evaluation)"),
            (self.train_size >= 1, "train_size must be >= 1"),
            (1 <= self.task_level <= 3, "task_level must be 1, 2 or 3"),
            (self.prompts_per_step >= 1, "prompts_per_step must be >= 1"),
            (self.num_generations >= 2, "num_generations must be >= 2: group-normalised advantages need a group"),
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (self.max_prompt_tokens >= 1, "max_prompt_tokens must be >= 1"),
            (self.temperature > 0, "temperature must be > 0"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1, "adam_beta1 and adam_beta2 must be in [0, 1)"),
            (self.max_grad_norm > 0, "max_grad_norm must be > 0 (clipping to a negative norm flips the gradient)"),
            (0.0 <= self.warmup_ratio < 1.0, "warmup_ratio must be in [0, 1)"),
            (self.lr_scheduler_type in ("cosine", "linear", "constant"),
             f"lr_scheduler_type must be cosine, linear or constant, got {self.lr_scheduler_type!r}"),
            (self.beta >= 0, "beta must be >= 0"),
            (0 <= self.epsilon_low < 1 and self.epsilon_high >= 0, "epsilon_low must be in [0, 1), epsilon_high >= 0"),
            (self.loss_agg in ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"),
             f"loss_agg must be token_mean, seq_mean_token_mean or seq_mean_token_sum_norm, got {self.loss_agg!r}"),
            (self.scale_rewards in ("group", "none"), f"scale_rewards must be 'group' or 'none', got {self.scale_rewards!r}"),
            (self.num_iterations >= 1, "num_iterations must be >= 1"),
            (self.loss_type in ("grpo", "cispo"), f"loss_type must be 'grpo' or 'cispo', got {self.loss_type!r}"),
            (self.importance_sampling_level in ("token", "sequence"),
             f"importance_sampling_level must be 'token' or 'sequence', got {self.importance_sampling_level!r}"),
            (0.0 <= self.top_entropy_quantile <= 1.0, "top_entropy_quantile must be in [0, 1] (1.0: every token)"),
            (self.max_num_gen_batches >= 1, "max_num_gen_batches must be >= 1 (the bound on a step's generation rounds)"),
            (self.soft_punish_cache >= 1, "soft_punish_cache must be >= 1 token"),
            ("soft_overlong" not in self.rewards or self.soft_punish_cache <= self.max_new_tokens,
             f"soft_punish_cache ({self.soft_punish_cache}) must not exceed max_new_tokens ({self.max_new_tokens}) "
             "with the soft_overlong reward: lower soft_punish_cache or raise max_new_tokens"),
            (self.micro_batch_size >= 1, "micro_batch_size must be >= 1"),
            (self.generation_batch_size >= 0, "generation_batch_size must be >= 0"),
            (self.keep_last >= 0, "keep_last must be >= 0"),
            (self.max_consecutive_skips >= 1, "max_consecutive_skips must be >= 1"),
            (self.logprob_backend in ("auto", "torch", "triton"), "logprob_backend must be auto, torch or triton"),
            (self.dtype in ("auto", "bfloat16", "float32"), "dtype must be auto, bfloat16 or float32"),
            (self.quantization in ("nf4", "int8", "none"), f"quantization must be nf4, int8 or none, got {self.quantization!r}"),
            (self.optim in ("adamw_torch", "paged_adamw_8bit"), f"optim must be adamw_torch or paged_adamw_8bit, got {self.optim!r}"),
            (self.max_tokens_per_micro_batch >= 0, "max_tokens_per_micro_batch must be >= 0"),
            (self.report_to in ("none", "tensorboard", "wandb", "trackio"),
             f"report_to must be none, tensorboard, wandb or trackio, got {self.report_to!r}"),
            (self.log_completions_every >= 0, "log_completions_every must be >= 0"),
            (self.dist_backend in ("auto", "nccl", "gloo"), f"dist_backend must be auto, nccl or gloo, got {self.dist_backend!r}"),
            (self.dist_timeout > 0, "dist_timeout must be > 0 seconds"),
            (bool(self.rewards) and all(isinstance(k, str) for k in self.rewards)
             and all(isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
                     for w in self.rewards.values()),
             "rewards must map reward names to finite numeric weights"),
            # bounded: a rank past any model's width adds nothing, and 99999999999999999999 overflowed torch (a traceback)
            (1 <= self.lora_r <= 8192, "lora_r must be in [1, 8192]"),
            (self.lora_alpha > 0, "lora_alpha must be > 0"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (bool(self.lora_target_modules) and all(isinstance(m, str) and m for m in self.lora_target_modules),
             "lora_target_modules must be a non-empty list of module names (e.g. [q_proj, v_proj])"),
            (all(isinstance(t, str) and t for t in self.stop_tokens), "stop_tokens must be a list of non-empty strings"),
            (self.top_k >= 0, "top_k must be >= 0 (0: off)"),
            (self.decode_cache in ("dynamic", "static", "compiled"),
             f"decode_cache must be dynamic, static or compiled, got {self.decode_cache!r}"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.logprob_chunk_bytes >= 0, "logprob_chunk_bytes must be >= 0 (0: the kernels' default, 256 MiB)"),
            (0 < self.reward_timeout <= 60, "reward_timeout must be in (0, 60] seconds"),
            (self.reward_workers >= 0, "reward_workers must be >= 0 (0: one per core, at most 8)"),
            ("{prompt}" in self.prompt_template, "prompt_template must contain {prompt}"),
            (self.on_bad_row in ("error", "skip"), "on_bad_row must be 'error' or 'skip'"),
            (self.data_preset in DATA_PRESETS, f"data_preset must be one of {', '.join(DATA_PRESETS)}, "
             f"got {self.data_preset!r}"),
            (bool(self.data_split.strip()), "data_split must not be empty"),
            (all(v is None or v.strip() for v in (self.data_config, self.prompt_field, self.answer_field,
                                                  self.image_field)),
             "data_config, prompt_field, answer_field and image_field must not be empty (leave them unset)"),
            (0 < self.min_pixels <= self.max_pixels, "need 0 < min_pixels <= max_pixels"),
            (bool(str(self.model).strip()), "model must name a directory or a Hub id"),
            (bool(str(self.data).strip()), "data must name a task, a file, a directory or a Hub id"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    # --- conversions ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


@functools.cache
def field_types() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}


def coerce(name: str, value, source: str):
    """Check/convert one override to the field's type; errors name the source and field."""
    types = field_types()
    if name not in types:
        close = [n for n in types if n.startswith(name[:4])]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"{source}: unknown config field {name!r}{hint}")
    kind = types[name]
    base = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
    target = base[0]
    if value is None and type(None) in typing.get_args(kind):
        return None
    if isinstance(value, str) and target is not str:
        try:
            value = float(value) if target is float else yaml.safe_load(value)  # YAML reads '1e-2' as a string
        except (ValueError, yaml.YAMLError):
            raise ConfigError(f"{source}: field {name!r} expects {target.__name__}, got {value!r}") from None
    try:
        if target is bool:
            if not isinstance(value, bool):
                raise TypeError
        elif target in (int, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError
            if not math.isfinite(value):
                raise ConfigError(f"{source}: field {name!r} must be a finite number, got {value!r}")
            if target is int and value != int(value):
                raise TypeError
            value = target(value)
        elif target is str:
            value = str(value)
        elif target in (list, dict) and not isinstance(value, target):
            raise TypeError
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: field {name!r} expects {target.__name__}, got {value!r}") from None
    return value


def parse_sets(items: list[str], source: str = "--set") -> dict:
    """`["key=value", ...]` -> `{key: value}` (values still strings; `coerce` types them). The one parser of
    `--set` for every command: an item without `=` is an error, never silently dropped."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{source} {item!r}: expected KEY=VALUE")
        overrides[key.strip().replace("-", "_")] = value
    return overrides


PATH_FIELDS = ("model", "tokenizer", "data", "init", "output_dir")


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """A copy of `cfg` whose local paths (model, tokenizer, data, init, output_dir) are absolute, so a saved
    run directory resumes, evaluates and exports from any working directory. Hub ids and task names stay."""
    changes = {}
    for name in PATH_FIELDS:
        value = getattr(cfg, name)
        if value and value != "none" and (name == "output_dir" or Path(value).exists()):
            changes[name] = str(Path(value).expanduser().resolve())
    return dataclasses.replace(cfg, **changes)


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config fields, got {type(data).__name__}")
    return {k: coerce(k, v, str(path)) for k, v in data.items()}


def default_config_path(stage: str) -> Path:
    return CONFIG_DIR / "tiny" / f"{stage}.yaml"


def resolve_config(stage: str | None = None, config_path: str | None = None,
                   overrides: dict | None = None) -> TrainConfig:
    """Defaults < tiny stage YAML (when neither a config file nor a model is given) < config file < overrides.

    `stage` None takes the config file's stage, else 'fre'."""
    overrides = {k: coerce(k, v, "command line") for k, v in (overrides or {}).items()}
    file_values = load_yaml(config_path) if config_path is not None else {}
    stage = stage or file_values.get("stage") or "fre"
    if stage not in STAGES:
        raise ConfigError(f"stage must be one of {STAGES}, got {stage!r}")
    values: dict = {}
    if config_path is None and "model" not in overrides:
        values.update(load_yaml(default_config_path(stage)))
    values.update(file_values)
    values.update(overrides)
    values["stage"] = stage
    model = values.get("model")
    if model and not Path(model).exists() and (REPO_ROOT / model).exists():
        values["model"] = str(REPO_ROOT / model)  # repo-relative paths (the shipped tiny model) work from any cwd
    return TrainConfig(**values)

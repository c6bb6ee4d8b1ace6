"""The language-model trainer's own options, each declared once with its type, default and help.

:class:`~reinforcepp.lm.config.LMConfig` joins them to the options every run has
(:class:`~reinforcepp.run.options.RunOptions`) and the trust region's
(:class:`~reinforcepp.config.TrustRegionOptions`), and adds the derived sizes, the presets and
the validation.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from ..config import Config, option
from ..core import ESTIMATORS, LossAgg
from ..engines import ENGINES


@dataclasses.dataclass
class LMOptions(Config):
    # --- models -------------------------------------------------------------------------
    model: Optional[str] = option(None, "policy: a Hugging Face hub name or local path; None = the built-in tiny model")
    tokenizer: Optional[str] = option(None, "tokenizer name or path (default: the policy's)")
    ref_model: Optional[str] = option(
        None, "reference model: a path, hub name or http(s):// URL of `reinforcepp serve reference` (default: a "
        "frozen copy of the initial policy); not loaded when kl_placement is 'none'")
    ref_update_every: int = option(
        0, "refresh the reference every this many steps (TRL's sync_ref_model): "
        "ref <- ref_update_alpha * policy + (1 - ref_update_alpha) * ref; 0 = never")
    ref_update_alpha: float = option(
        1.0, "ref_update_every: weight of the policy in the refreshed reference (1 = copy the policy; TRL's "
        "ref_model_mixup_alpha default is 0.6)")
    critic_model: Optional[str] = option(
        None, "critic backbone for estimator 'gae' (default: a copy of the policy with a scalar value head)")
    trust_remote_code: bool = option(False, "allow model repositories to run their own code")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option(
        "auto", "compute dtype of the models (trained weights and AdamW state stay float32: autocast without FSDP, "
        "MixedPrecisionPolicy with it; reference and LoRA base are held in it); auto = float32 on CPU, bfloat16 on a "
        "GPU that supports it")
    device: str = option("auto", "torch device; auto = cuda if available, else cpu")
    autocast: Literal["off", "bfloat16", "auto"] = option(
        "off", "mixed precision of the forward passes (sampling, log-probs, update): bfloat16 autocast over float32 "
        "weights (log-softmax, losses and optimizer stay float32); auto = bfloat16 on a GPU that supports it or a CPU "
        "with AMX/AVX512-BF16, else off")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    torch_compile: Literal["off", "update", "decode", "all"] = option(
        "off", "torch.compile: update = the update's forward and backward (dynamic shapes); decode = the hf engine's "
        "one-token decoding step, over a static key/value cache; all = both. The first steps pay the compilation "
        "(tens of seconds on a CPU); measured in benchmarks/lm.md")
    fsdp: bool = option(
        False, "under torchrun: shard policy, critic and reference over the ranks with FSDP2 (fully_shard per decoder "
        "layer, then the root; float32 master weights, compute in dtype); false = every rank holds a whole copy (DDP)")
    ref_offload: bool = option(False, "fsdp: keep the reference's shards in CPU memory (FSDP2 CPUOffloadPolicy)")
    lora_rank: int = option(
        0, "LoRA adapter rank r (PEFT, the lora extra); 0 = full fine-tuning. The reference is then the base with "
        "adapters disabled")
    lora_alpha: float = option(32.0, "LoRA scale numerator: adapters add (lora_alpha / lora_rank) B A x")
    lora_dropout: float = option(0.0, "dropout on the LoRA branch's input")
    lora_target_modules: list[str] = option(
        [], "names of the linear layers that get adapters (q_proj, v_proj, ...); empty = every linear layer of "
        "attention and MLP")
    torch_threads: int = option(0, "CPU threads for torch; 0 = one per physical core")
    # --- remote services (ref_model or reward_funcs given as http(s):// URLs) -------------------
    remote_timeout: float = option(
        60.0, "seconds one request to a remote reference or reward server may take in total (connect to last byte)")
    remote_retries: int = option(
        3, "retries (exponential backoff from 0.5 s) after a connection error or HTTP 502/503/504")
    remote_token_file: Optional[str] = option(
        None, "file holding the servers' bearer token (default: the REINFORCEPP_REMOTE_TOKEN environment variable)")
    remote_concurrency: int = option(4, "requests in flight at once to one remote server")
    remote_batch_size: int = option(
        64, "responses per request to a remote server (a micro-batch larger than this is sent as concurrent requests)")
    # --- data and task --------------------------------------------------------------------
    task: Optional[Literal["sort", "reverse", "add", "tools"]] = option(
        None, "built-in verifiable task (generated data and its reward; tools: multi-turn, a calculator tool); None = "
        "sort when neither train_data nor eval_data is given, no built-in task otherwise (setting both is an error)")
    train_data: Optional[str] = option(
        None, "prompt dataset: .jsonl, .parquet, a save_to_disk directory or a hub dataset name")
    eval_data: Optional[str] = option(
        None, "held-out prompt dataset (same formats); enough on its own for `reinforcepp eval`")
    eval_fraction: float = option(
        0.0, "when eval_data is None: fraction of train_data split off (seeded) for evaluation")
    prompt_column: str = option("prompt", "column holding the prompt: a string or a list of chat messages")
    use_chat_template: bool = option(True, "apply the tokenizer's chat template to prompts when it has one")
    max_prompt_length: int = option(
        1024, "prompts longer than this many tokens (or than the model's context minus max_new_tokens) are an error")
    truncate_prompts: bool = option(
        False, "cut prompts that are too long to their last allowed tokens instead of stopping (counted in "
        "data/truncated_prompts)")
    # --- multi-turn environments (docs/agents.md) ---------------------------------------------
    environment: Optional[str] = option(
        None, "multi-turn episodes: module:factory or path/file.py:factory returning a fresh environment (reset(row), "
        "step(text)) per episode; None = one turn (task=tools brings its own)")
    max_turns: int = option(
        4, "multi-turn episodes: model turns per episode at most (max_new_tokens applies to each turn)")
    max_observation_tokens: int = option(256, "multi-turn episodes: an observation is cut to this many tokens")
    # --- rewards ----------------------------------------------------------------------------
    reward_funcs: list[str] = option(
        [], "reward sources: module:function, path/file.py:function, verl:..., openrlhf:..., rm:MODEL, http(s)://URL; "
        "empty = the built-in task's reward")
    reward_weights: list[float] = option([], "one weight per reward source (default: all 1)")
    reward_on_error: Literal["raise", "drop"] = option(
        "raise", "a reward function that fails on a sample: stop with an error, or drop the sample and count it")
    reward_timeout: Optional[float] = option(
        600.0, "seconds each reward call may take (sources run concurrently); a call past it stops the run with one "
        "line naming the source; None = no bound")
    reward_step_delimiter: Optional[str] = option(
        None, "process rewards: a reward function returning a list per completion gives one reward per step, steps "
        "separated by this string, each placed on the step's last token; None = one reward per completion token")
    overlong_buffer: int = option(0, "DAPO soft overlong penalty: length of the ramp before max_new_tokens (0 = off)")
    overlong_penalty: float = option(1.0, "DAPO overlong penalty at max_new_tokens")
    truncation_penalty: float = option(0.0, "subtracted from the reward of responses cut at max_new_tokens without EOS")
    mask_truncated_completions: bool = option(
        False, "leave responses cut at max_new_tokens without EOS out of the loss (TRL's mask_truncated_completions); "
        "they still count in the advantage statistics")
    dynamic_filtering: bool = option(
        False, "DAPO dynamic sampling: drop groups whose rewards are all equal and sample more prompts to refill")
    max_filter_rounds: int = option(4, "dynamic_filtering: at most this many generation rounds per step")
    # --- algorithm --------------------------------------------------------------------------
    estimator: str = option("reinforce_pp", "advantage estimator: " + ", ".join(sorted(ESTIMATORS)))
    gamma: float = option(1.0, "discount of token rewards")
    lam: float = option(0.95, "GAE lambda (gae only)")
    kl_placement: Optional[Literal["reward", "loss", "none"]] = option(
        None, "where the KL to the reference goes; None = the estimator's choice (reward for reinforce_pp, gae, "
        "reinforce; loss for reinforce_pp_baseline and the group estimators)")
    kl_estimator: Optional[Literal["k1", "k2", "k3", "abs", "k3+"]] = option(
        None, "KL estimator; None = k1 in the reward, k3 in the loss; k3+ = the value of k3 with the gradient of k2 "
        "(verl), in the loss only")
    kl_coef: float = option(0.01, "beta, the KL coefficient (initial value when kl_target is set)")
    kl_target: Optional[float] = option(None, "adaptive KL controller target (per-sequence KL); None = fixed kl_coef")
    kl_horizon: int = option(10000, "adaptive KL controller horizon (responses)")
    reward_clip: float = option(
        10.0, "scalar rewards (after the group baseline, for estimators that have one) are clipped to [-reward_clip, "
        "reward_clip]")
    rloo_whiten: bool = option(False, "rloo: globally whiten the leave-one-out advantages")
    scale_rewards: Literal["group", "batch", "none"] = option(
        "group", "grpo: divide R - group mean by the group's std, the batch's std, or nothing (TRL's scale_rewards)")
    eps_low: float = option(0.2, "lower clip of the importance ratio: 1 - eps_low")
    eps_high: float = option(0.2, "upper clip of the importance ratio: 1 + eps_high (DAPO clip-higher: 0.28)")
    dual_clip: Optional[float] = option(None, "dual clip constant c > 1 for negative advantages; None = off")
    importance_sampling_level: Literal["token", "sequence"] = option(
        "token", "importance ratio per token (PPO), or per sequence, the length-normalised sequence ratio (GSPO; pair "
        "with small eps_low/eps_high such as 3e-4/4e-4)")
    policy_loss: Literal["ppo", "cispo", "clip_cov", "kl_cov"] = option(
        "ppo", "the per-token policy loss (docs/algorithms.md, 'Loss variants'): ppo = the clipped ratio; cispo = the "
        "REINFORCE term under a clipped, stop-gradient importance weight (MiniMax-M1); clip_cov / kl_cov = "
        "PPO with the gradient of a few high-covariance tokens detached / KL-penalised (Cui et al. 2025, verl)")
    cispo_eps_low: Optional[float] = option(
        None, "cispo: the weight is at least 1 - cispo_eps_low; None = no lower bound (MiniMax-M1)")
    cispo_eps_high: float = option(4.0, "cispo: the weight is at most 1 + cispo_eps_high (ScaleRL's and SkyRL's 5)")
    clip_cov_ratio: float = option(
        2e-4, "clip_cov: fraction of the real tokens whose gradient is detached (verl: 2e-4)")
    clip_cov_lb: float = option(
        1.0, "clip_cov: tokens are drawn among those with covariance in (clip_cov_lb, clip_cov_ub)")
    clip_cov_ub: float = option(5.0, "clip_cov: upper bound of that covariance band")
    kl_cov_ratio: float = option(
        2e-4, "kl_cov: fraction of the real tokens, those of largest covariance, that are KL-penalised (verl: 2e-4)")
    kl_cov_coef: float = option(1.0, "kl_cov: coefficient of the |logp - old_logp| penalty on them")
    teacher: Optional[str] = option(
        None, "on-policy distillation: a model (path or hub name) whose per-token reverse KL to the policy, "
        "-(logp - teacher_logp) on every sampled token, is added to the token rewards "
        "(weighted by teacher_coef); it must share the policy's tokenizer; token-level "
        "estimators only (reinforce_pp, reinforce_pp_baseline, reinforce, gae)")
    teacher_coef: float = option(1.0, "teacher: weight of the distillation reward")
    # --- asynchronous rollouts and off-policy correction (docs/algorithms.md) -------------------
    async_rollouts: int = option(
        0, "N > 0: the engine generates the rollouts of steps t+1..t+N (with its own copy of the weights) while the "
        "trainer updates on step t; a sample is at most N policy versions old; 0 = the synchronous loop")
    partial_rollouts: bool = option(
        False, "async_rollouts: generate each response in N+1 segments, the weights advancing one version per segment "
        "(the last segment on-policy): a generation in flight when the weights change continues under the new ones")
    rollout_correction: Optional[Literal["none", "truncate", "mask"]] = option(
        None, "off-policy correction of each token's policy-gradient loss by w = pi_old / mu (the engine's sampling "
        "log-probs mu): truncate = min(w, rollout_correction_high); mask = 0 outside "
        "[low, high]; none; None = truncate with async_rollouts > 0, else none")
    rollout_correction_level: Literal["token", "sequence", "geometric"] = option(
        "token", "the weight per token, per response (the product of its tokens' weights) or as their geometric mean")
    rollout_correction_low: Optional[float] = option(None, "mask: the lower bound of the weight (None = 0)")
    rollout_correction_high: float = option(
        2.0, "truncate: the cap of the weight; mask: its upper bound (verl's default: 2)")
    entropy_coef: float = option(0.0, "entropy bonus coefficient (entropy is logged either way)")
    loss_agg: Optional[LossAgg] = option(
        None, "loss aggregation; None = the estimator's (token-mean; seq-mean-token-sum-norm for dr_grpo)")
    value_clip: Optional[float] = option(0.2, "gae: clip range of the value loss; None = unclipped")
    critic_lr: float = option(1e-5, "gae: critic learning rate")
    # --- batch and optimisation -------------------------------------------------------------
    total_steps: int = option(100, "RL steps (one rollout each)")
    prompts_per_step: int = option(16, "prompts per rollout")
    samples_per_prompt: int = option(4, "responses sampled per prompt (group size)")
    mini_batch_size: Optional[int] = option(None, "responses per optimizer step; None = the whole rollout")
    micro_batch_size: int = option(
        16, "responses per forward/backward (gradient accumulation inside a mini-batch); unused with "
        "micro_batch_tokens")
    micro_batch_tokens: Optional[int] = option(
        None, "micro-batches of at most this many tokens (prompt + response, a shared prompt counted once) instead of "
        "a count of responses, balanced (first-fit decreasing, then largest-first), and under torchrun the groups "
        "spread over the ranks by tokens; None = micro_batch_size responses each")
    pack_sequences: bool = option(
        False, "run each forward of the update, the old and reference log-probs and the critic as one packed row: no "
        "padding, positions restarting per sequence, attention kept inside each (with share_prompt a prompt and its "
        "responses form one tree); llama, qwen2, qwen3 with sdpa, eager, flex or flash attention")
    epochs: int = option(1, "passes over each rollout")
    lr: float = option(1e-6, "policy learning rate (AdamW)")
    lr_schedule: Literal["constant", "cosine"] = option(
        "constant", "after warmup: constant, or cosine decay to lr_min_ratio * lr")
    lr_min_ratio: float = option(0.1, "cosine schedule floor, as a fraction of lr")
    warmup_steps: int = option(0, "linear warmup, in optimizer steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient-norm clipping")
    # --- generation -------------------------------------------------------------------------
    engine: str = option(
        "hf", "generation engine registered in reinforcepp.engines: "
        + "; ".join(f"{s.name}: {s.help}" for s in ENGINES.values()))
    vllm_gpu_memory_utilization: float = option(
        0.3, "engine=vllm on a GPU: fraction of GPU memory vLLM takes for its weights and KV cache (the rest is the "
        "trainer's)")
    vllm_sleep: bool = option(
        False, "engine=vllm on a GPU: put vLLM to sleep (KV cache freed, weights offloaded) while the trainer "
        "computes log-probs and updates, wake it for the next rollout")
    # --- rollout servers (docs/remote.md, "Rollout servers") -----------------------------------
    rollout_urls: list[str] = option(
        [], "generate on rollout servers: `reinforcepp serve rollout` URLs (http(s)://host:port) or plain "
        "`vllm serve` ones (vllm+http(s)://host:port), requests spread by load, weights pushed after every update; "
        "selects engine=remote")
    rollout_timeout: float = option(
        600.0, "seconds one generation request or one weight chunk to a rollout server may take")
    max_new_tokens: int = option(256, "response length limit")
    temperature: float = option(1.0, "sampling temperature")
    top_p: float = option(1.0, "nucleus sampling")
    top_k: int = option(0, "top-k sampling; 0 = off")
    logprob_chunk_size: int = option(64, "time steps per chunk when computing float32 log-probs")
    share_prompt: bool = option(
        True, "forward passes compute each distinct prompt of a micro-batch once for all its samples (same numbers, "
        "less work)")
    fuse_old_logprobs: Optional[bool] = option(
        None, "when the rollout is used once (epochs=1, one mini-batch) and the KL is in the reward: take "
        "old_logprobs from the update's own forward instead of a separate pass (same results, one forward less); it "
        "holds every micro-batch's graph until the advantages are known; None = only when the rollout is one "
        "micro-batch (nothing extra held)")
    # --- evaluation -------------------------------------------------------------------------
    eval_every: int = option(10, "evaluate every this many steps (and at start and end); 0 = never")
    eval_max_prompts: int = option(200, "at most this many held-out prompts per evaluation")
    eval_samples: int = option(
        4, "n samples per held-out prompt (at eval_temperature): eval/any_correct_of_n and the unbiased eval/pass@k "
        "for k = 1, 2, 4, ... < n; greedy accuracy is always reported")
    eval_temperature: float = option(1.0, "sampling temperature for pass@k")
    # --- warm start (built-in tasks) ----------------------------------------------------------
    sft_steps: int = option(
        0, "supervised warm-start steps on the task's answers before RL (built-in tasks; `reinforcepp sft` for your "
        "data)")
    sft_lr: float = option(3e-3, "warm-start learning rate")
    sft_batch_size: int = option(32, "warm-start batch size")
    sft_wrong_fraction: float = option(
        0.0, "built-in tasks: fraction of warm-start demonstrations that show the task's plausible wrong behaviour "
        "(mixed-quality data)")
    task_size: int = option(
        5000, "built-in tasks: training prompts generated (a small set, e.g. 16, to study overfitting against the "
        "held-out prompts)")
    reward_noise: float = option(
        0.0, "standard deviation of Gaussian noise added to each training sample's reward (seeded by run seed, rank, "
        "step and round; evaluations see the clean reward): to study estimators under a noisy reward")
    # --- outputs ------------------------------------------------------------------------------
    save_every: int = option(
        10, "checkpoint every this many steps and at the end (keep_last are kept), so that a stopped run resumes from "
        "at most this many steps back; 0 = only at the end. A checkpoint writes about 12 bytes per policy parameter "
        "(weights and AdamW moments); on the built-in task each takes 0.01-0.1 s, under 1.5% of the steps' time "
        "(docs/lm.md, \"Outputs, checkpoints, resuming\")")
    log_samples_every: int = option(10, "write sample completions with rewards every this many steps; 0 = never")
    num_logged_samples: int = option(4, "completions written each time")
    profile: bool = option(False, "print time per phase and the update's FLOP/s utilisation at the end")
    deterministic: bool = option(False, "torch deterministic algorithms (bit-exact resume on CPU)")

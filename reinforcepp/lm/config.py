"""The one configuration of the language-model trainer: YAML file, ``key=value`` overrides and
the Python API all build this dataclass, validated once before any model is loaded.

Batch sizes are counted in *responses* (one prompt's sample = one response) unless the name
says prompts: a step generates ``prompts_per_step * samples_per_prompt`` responses (the
rollout), which is split into mini-batches of ``mini_batch_size`` responses (one optimizer step
each), each accumulated over micro-batches of ``micro_batch_size`` responses, for ``epochs``
passes.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, Optional, cast

from ..config import ConfigError, TrustRegionOptions, option
from ..core import ESTIMATORS, KL_ESTIMATORS, LOSS_AGGS, KLEstimatorName, LossAgg, get_estimator
from ..engines import ENGINES, check_engine_config
from ..run.options import RunOptions


@dataclasses.dataclass
class LMConfig(TrustRegionOptions, RunOptions):
    COMMON = ("model", "train_data", "eval_data", "reward_funcs", "output_dir", "estimator", "lr", "total_steps", "prompts_per_step",
              "samples_per_prompt", "max_new_tokens", "micro_batch_size", "kl_coef", "eval_every", "save_every", "resume")
    SECTIONS = (("output_dir", "Run folder and logging"), ("model", "Models"), ("remote_timeout", "Remote services"),
                ("task", "Data and task"), ("environment", "Multi-turn episodes"), ("reward_funcs", "Rewards"),
                ("estimator", "Algorithm"), ("trust_region", "Trust region"),
                ("async_rollouts", "Asynchronous rollouts and off-policy correction"),
                ("total_steps", "Batch and optimisation"), ("engine", "Generation"),
                ("eval_every", "Evaluation"), ("sft_steps", "Warm start (built-in tasks)"), ("save_every", "Checkpoints and outputs"))
    # --- models -------------------------------------------------------------------------
    model: Optional[str] = option(None, "policy: a Hugging Face hub name or local path; None = the built-in tiny model")
    tokenizer: Optional[str] = option(None, "tokenizer name or path (default: the policy's)")
    ref_model: Optional[str] = option(None, "reference model: a path, hub name or http(s):// URL of `reinforcepp serve reference` (default: a frozen copy of the initial policy); not loaded when kl_placement is 'none'")
    ref_update_every: int = option(0, "refresh the reference every this many steps (TRL's sync_ref_model): ref <- ref_update_alpha * policy + (1 - ref_update_alpha) * ref; 0 = never")
    ref_update_alpha: float = option(1.0, "ref_update_every: weight of the policy in the refreshed reference (1 = copy the policy; TRL's ref_model_mixup_alpha default is 0.6)")
    critic_model: Optional[str] = option(None, "critic backbone for estimator 'gae' (default: a copy of the policy with a scalar value head)")
    trust_remote_code: bool = option(False, "allow model repositories to run their own code")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = option("auto", "compute dtype of the models (trained weights and AdamW state stay float32: autocast without FSDP, MixedPrecisionPolicy with it; reference and LoRA base are held in it); auto = float32 on CPU, bfloat16 on a GPU that supports it")
    device: str = option("auto", "torch device; auto = cuda if available, else cpu")
    autocast: Literal["off", "bfloat16", "auto"] = option("off", "mixed precision of the forward passes (sampling, log-probs, update): bfloat16 autocast over float32 weights (log-softmax, losses and optimizer stay float32); auto = bfloat16 on a GPU that supports it or a CPU with AMX/AVX512-BF16, else off")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass to save memory")
    torch_compile: Literal["off", "update", "decode", "all"] = option("off", "torch.compile: update = the update's forward and backward (dynamic shapes); decode = the hf engine's one-token decoding step, over a static key/value cache; all = both. The first steps pay the compilation (tens of seconds on a CPU); measured in benchmarks/lm.md")
    fsdp: bool = option(False, "under torchrun: shard policy, critic and reference over the ranks with FSDP2 (fully_shard per decoder layer, then the root; float32 master weights, compute in dtype); false = every rank holds a whole copy (DDP)")
    ref_offload: bool = option(False, "fsdp: keep the reference's shards in CPU memory (FSDP2 CPUOffloadPolicy)")
    lora_rank: int = option(0, "LoRA adapter rank r (PEFT, the lora extra); 0 = full fine-tuning. The reference is then the base with adapters disabled")
    lora_alpha: float = option(32.0, "LoRA scale numerator: adapters add (lora_alpha / lora_rank) B A x")
    lora_dropout: float = option(0.0, "dropout on the LoRA branch's input")
    lora_target_modules: list[str] = option([], "names of the linear layers that get adapters (q_proj, v_proj, ...); empty = every linear layer of attention and MLP")
    torch_threads: int = option(0, "CPU threads for torch; 0 = one per physical core")
    # --- remote services (ref_model or reward_funcs given as http(s):// URLs) -------------------
    remote_timeout: float = option(60.0, "seconds one request to a remote reference or reward server may take in total (connect to last byte)")
    remote_retries: int = option(3, "retries (exponential backoff from 0.5 s) after a connection error or HTTP 502/503/504")
    remote_token_file: Optional[str] = option(None, "file holding the servers' bearer token (default: the REINFORCEPP_REMOTE_TOKEN environment variable)")
    remote_concurrency: int = option(4, "requests in flight at once to one remote server")
    remote_batch_size: int = option(64, "responses per request to a remote server (a micro-batch larger than this is sent as concurrent requests)")
    # --- data and task --------------------------------------------------------------------
    task: Optional[Literal["sort", "reverse", "add", "tools"]] = option(None, "built-in verifiable task (generated data and its reward; tools: multi-turn, a calculator tool); None = sort when neither train_data nor eval_data is given, no built-in task otherwise (setting both is an error)")
    train_data: Optional[str] = option(None, "prompt dataset: .jsonl, .parquet, a save_to_disk directory or a hub dataset name")
    eval_data: Optional[str] = option(None, "held-out prompt dataset (same formats); enough on its own for `reinforcepp eval`")
    eval_fraction: float = option(0.0, "when eval_data is None: fraction of train_data split off (seeded) for evaluation")
    prompt_column: str = option("prompt", "column holding the prompt: a string or a list of chat messages")
    use_chat_template: bool = option(True, "apply the tokenizer's chat template to prompts when it has one")
    max_prompt_length: int = option(1024, "prompts longer than this many tokens (or than the model's context minus max_new_tokens) are an error")
    truncate_prompts: bool = option(False, "cut prompts that are too long to their last allowed tokens instead of stopping (counted in data/truncated_prompts)")
    # --- multi-turn environments (docs/agents.md) ---------------------------------------------
    environment: Optional[str] = option(None, "multi-turn episodes: module:factory or path/file.py:factory returning a fresh environment (reset(row), step(text)) per episode; None = one turn (task=tools brings its own)")
    max_turns: int = option(4, "multi-turn episodes: model turns per episode at most (max_new_tokens applies to each turn)")
    max_observation_tokens: int = option(256, "multi-turn episodes: an observation is cut to this many tokens")
    # --- rewards ----------------------------------------------------------------------------
    reward_funcs: list[str] = option([], "reward sources: module:function, path/file.py:function, verl:..., openrlhf:..., rm:MODEL, http(s)://URL; empty = the built-in task's reward")
    reward_weights: list[float] = option([], "one weight per reward source (default: all 1)")
    reward_on_error: Literal["raise", "drop"] = option("raise", "a reward function that fails on a sample: stop with an error, or drop the sample and count it")
    reward_timeout: Optional[float] = option(600.0, "seconds each reward call may take (sources run concurrently); a call past it stops the run with one line naming the source; None = no bound")
    reward_step_delimiter: Optional[str] = option(None, "process rewards: a reward function returning a list per completion gives one reward per step, steps separated by this string, each placed on the step's last token; None = one reward per completion token")
    overlong_buffer: int = option(0, "DAPO soft overlong penalty: length of the ramp before max_new_tokens (0 = off)")
    overlong_penalty: float = option(1.0, "DAPO overlong penalty at max_new_tokens")
    truncation_penalty: float = option(0.0, "subtracted from the reward of responses cut at max_new_tokens without EOS")
    mask_truncated_completions: bool = option(False, "leave responses cut at max_new_tokens without EOS out of the loss (TRL's mask_truncated_completions); they still count in the advantage statistics")
    dynamic_filtering: bool = option(False, "DAPO dynamic sampling: drop groups whose rewards are all equal and sample more prompts to refill")
    max_filter_rounds: int = option(4, "dynamic_filtering: at most this many generation rounds per step")
    # --- algorithm --------------------------------------------------------------------------
    estimator: str = option("reinforce_pp", "advantage estimator: " + ", ".join(sorted(ESTIMATORS)))
    gamma: float = option(1.0, "discount of token rewards")
    lam: float = option(0.95, "GAE lambda (gae only)")
    kl_placement: Optional[Literal["reward", "loss", "none"]] = option(None, "where the KL to the reference goes; None = the estimator's choice (reward for reinforce_pp, gae, reinforce; loss for reinforce_pp_baseline and the group estimators)")
    kl_estimator: Optional[Literal["k1", "k2", "k3", "abs", "k3+"]] = option(None, "KL estimator; None = k1 in the reward, k3 in the loss; k3+ = the value of k3 with the gradient of k2 (verl), in the loss only")
    kl_coef: float = option(0.01, "beta, the KL coefficient (initial value when kl_target is set)")
    kl_target: Optional[float] = option(None, "adaptive KL controller target (per-sequence KL); None = fixed kl_coef")
    kl_horizon: int = option(10000, "adaptive KL controller horizon (responses)")
    reward_clip: float = option(10.0, "scalar rewards (after the group baseline, for estimators that have one) are clipped to [-reward_clip, reward_clip]")
    rloo_whiten: bool = option(False, "rloo: globally whiten the leave-one-out advantages")
    scale_rewards: Literal["group", "batch", "none"] = option("group", "grpo: divide R - group mean by the group's std, the batch's std, or nothing (TRL's scale_rewards)")
    eps_low: float = option(0.2, "lower clip of the importance ratio: 1 - eps_low")
    eps_high: float = option(0.2, "upper clip of the importance ratio: 1 + eps_high (DAPO clip-higher: 0.28)")
    dual_clip: Optional[float] = option(None, "dual clip constant c > 1 for negative advantages; None = off")
    importance_sampling_level: Literal["token", "sequence"] = option("token", "importance ratio per token (PPO), or per sequence, the length-normalised sequence ratio (GSPO; pair with small eps_low/eps_high such as 3e-4/4e-4)")
    policy_loss: Literal["ppo", "cispo", "clip_cov", "kl_cov"] = option(
        "ppo", "the per-token policy loss (docs/algorithms.md, 'Loss variants'): ppo = the clipped ratio; cispo = the "
        "REINFORCE term under a clipped, stop-gradient importance weight (MiniMax-M1); clip_cov / kl_cov = PPO with the "
        "gradient of a few high-covariance tokens detached / KL-penalised (Cui et al. 2025, verl)")
    cispo_eps_low: Optional[float] = option(None, "cispo: the weight is at least 1 - cispo_eps_low; None = no lower bound (MiniMax-M1)")
    cispo_eps_high: float = option(4.0, "cispo: the weight is at most 1 + cispo_eps_high (ScaleRL's and SkyRL's 5)")
    clip_cov_ratio: float = option(2e-4, "clip_cov: fraction of the real tokens whose gradient is detached (verl: 2e-4)")
    clip_cov_lb: float = option(1.0, "clip_cov: tokens are drawn among those with covariance in (clip_cov_lb, clip_cov_ub)")
    clip_cov_ub: float = option(5.0, "clip_cov: upper bound of that covariance band")
    kl_cov_ratio: float = option(2e-4, "kl_cov: fraction of the real tokens, those of largest covariance, that are KL-penalised (verl: 2e-4)")
    kl_cov_coef: float = option(1.0, "kl_cov: coefficient of the |logp - old_logp| penalty on them")
    teacher: Optional[str] = option(
        None, "on-policy distillation: a model (path or hub name) whose per-token reverse KL to the policy, "
        "-(logp - teacher_logp) on every sampled token, is added to the token rewards (weighted by teacher_coef); it must "
        "share the policy's tokenizer; token-level estimators only (reinforce_pp, reinforce_pp_baseline, reinforce, gae)")
    teacher_coef: float = option(1.0, "teacher: weight of the distillation reward")
    # --- asynchronous rollouts and off-policy correction (docs/algorithms.md) -------------------
    async_rollouts: int = option(
        0, "N > 0: the engine generates the rollouts of steps t+1..t+N (with its own copy of the weights) while the trainer "
        "updates on step t; a sample is at most N policy versions old; 0 = the synchronous loop")
    partial_rollouts: bool = option(
        False, "async_rollouts: generate each response in N+1 segments, the weights advancing one version per segment (the "
        "last segment on-policy): a generation in flight when the weights change continues under the new ones")
    rollout_correction: Optional[Literal["none", "truncate", "mask"]] = option(
        None, "off-policy correction of each token's policy-gradient loss by w = pi_old / mu (the engine's sampling "
        "log-probs mu): truncate = min(w, rollout_correction_high); mask = 0 outside [low, high]; none; None = truncate "
        "with async_rollouts > 0, else none")
    rollout_correction_level: Literal["token", "sequence", "geometric"] = option(
        "token", "the weight per token, per response (the product of its tokens' weights) or as their geometric mean")
    rollout_correction_low: Optional[float] = option(None, "mask: the lower bound of the weight (None = 0)")
    rollout_correction_high: float = option(2.0, "truncate: the cap of the weight; mask: its upper bound (verl's default: 2)")
    entropy_coef: float = option(0.0, "entropy bonus coefficient (entropy is logged either way)")
    loss_agg: Optional[Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]] = option(None, "loss aggregation; None = the estimator's (token-mean; seq-mean-token-sum-norm for dr_grpo)")
    value_clip: Optional[float] = option(0.2, "gae: clip range of the value loss; None = unclipped")
    critic_lr: float = option(1e-5, "gae: critic learning rate")
    # --- batch and optimisation -------------------------------------------------------------
    total_steps: int = option(100, "RL steps (one rollout each)")
    prompts_per_step: int = option(16, "prompts per rollout")
    samples_per_prompt: int = option(4, "responses sampled per prompt (group size)")
    mini_batch_size: Optional[int] = option(None, "responses per optimizer step; None = the whole rollout")
    micro_batch_size: int = option(16, "responses per forward/backward (gradient accumulation inside a mini-batch); unused with micro_batch_tokens")
    micro_batch_tokens: Optional[int] = option(
        None, "micro-batches of at most this many tokens (prompt + response, a shared prompt counted once) instead of a "
        "count of responses, balanced (first-fit decreasing, then largest-first), and under torchrun the groups spread "
        "over the ranks by tokens; None = micro_batch_size responses each")
    pack_sequences: bool = option(
        False, "run each forward of the update, the old and reference log-probs and the critic as one packed row: no "
        "padding, positions restarting per sequence, attention kept inside each (with share_prompt a prompt and its "
        "responses form one tree); llama, qwen2, qwen3 with sdpa, eager, flex or flash attention")
    epochs: int = option(1, "passes over each rollout")
    lr: float = option(1e-6, "policy learning rate (AdamW)")
    lr_schedule: Literal["constant", "cosine"] = option("constant", "after warmup: constant, or cosine decay to lr_min_ratio * lr")
    lr_min_ratio: float = option(0.1, "cosine schedule floor, as a fraction of lr")
    warmup_steps: int = option(0, "linear warmup, in optimizer steps")
    weight_decay: float = option(0.0, "AdamW weight decay")
    max_grad_norm: float = option(1.0, "gradient-norm clipping")
    # --- generation -------------------------------------------------------------------------
    engine: str = option("hf", "generation engine registered in reinforcepp.engines: " + "; ".join(f"{s.name}: {s.help}" for s in ENGINES.values()))
    vllm_gpu_memory_utilization: float = option(0.3, "engine=vllm on a GPU: fraction of GPU memory vLLM takes for its weights and KV cache (the rest is the trainer's)")
    vllm_sleep: bool = option(False, "engine=vllm on a GPU: put vLLM to sleep (KV cache freed, weights offloaded) while the trainer computes log-probs and updates, wake it for the next rollout")
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
    share_prompt: bool = option(True, "forward passes compute each distinct prompt of a micro-batch once for all its samples (same numbers, less work)")
    fuse_old_logprobs: Optional[bool] = option(None, "when the rollout is used once (epochs=1, one mini-batch) and the KL is in the reward: take old_logprobs from the update's own forward instead of a separate pass (same results, one forward less); it holds every micro-batch's graph until the advantages are known; None = only when the rollout is one micro-batch (nothing extra held)")
    # --- evaluation -------------------------------------------------------------------------
    eval_every: int = option(10, "evaluate every this many steps (and at start and end); 0 = never")
    eval_max_prompts: int = option(200, "at most this many held-out prompts per evaluation")
    eval_samples: int = option(4, "n samples per held-out prompt (at eval_temperature): eval/any_correct_of_n and the unbiased eval/pass@k for k = 1, 2, 4, ... < n; greedy accuracy is always reported")
    eval_temperature: float = option(1.0, "sampling temperature for pass@k")
    # --- warm start (built-in tasks) ----------------------------------------------------------
    sft_steps: int = option(0, "supervised warm-start steps on the task's answers before RL (built-in tasks; `reinforcepp sft` for your data)")
    sft_lr: float = option(3e-3, "warm-start learning rate")
    sft_batch_size: int = option(32, "warm-start batch size")
    sft_wrong_fraction: float = option(0.0, "built-in tasks: fraction of warm-start demonstrations that show the task's plausible wrong behaviour (mixed-quality data)")
    task_size: int = option(5000, "built-in tasks: training prompts generated (a small set, e.g. 16, to study overfitting against the held-out prompts)")
    reward_noise: float = option(0.0, "standard deviation of Gaussian noise added to each training sample's reward (seeded by run seed, rank, step and round; evaluations see the clean reward): to study estimators under a noisy reward")
    # --- outputs ------------------------------------------------------------------------------
    save_every: int = option(10, "checkpoint every this many steps and at the end (keep_last are kept), so that a stopped run resumes from at most this many steps back; 0 = only at the end. A checkpoint writes about 12 bytes per policy parameter (weights and AdamW moments); on the built-in task each takes 0.01-0.1 s, under 1.5% of the steps' time (docs/lm.md, \"Outputs, checkpoints, resuming\")")
    log_samples_every: int = option(10, "write sample completions with rewards every this many steps; 0 = never")
    num_logged_samples: int = option(4, "completions written each time")
    profile: bool = option(False, "print time per phase and the update's FLOP/s utilisation at the end")
    deterministic: bool = option(False, "torch deterministic algorithms (bit-exact resume on CPU)")

    @classmethod
    def from_dict(cls, values: dict) -> "LMConfig":
        """:meth:`Config.from_dict`; ``rollout_urls`` without ``engine`` selects ``engine=remote``,
        and with any other ``engine`` is refused."""
        urls = values.get("rollout_urls")
        if urls not in (None, "", [], "[]", "None", "none") and values.get("engine", "remote") != "remote":
            raise ConfigError(f"rollout_urls sends generation to rollout servers (engine=remote), but "
                              f"engine={values['engine']} is set too: drop engine, or rollout_urls")
        if urls not in (None, "", [], "[]", "None", "none"):
            values = {**values, "engine": "remote"}
        return super().from_dict(values)

    def _validate_scale(self) -> None:
        """LoRA and sharding options: refused in combinations that cannot work, naming both keys."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name.startswith("lora_") and f.name != "lora_rank"}
        if self.lora_rank < 0:
            raise ConfigError(f"lora_rank must be >= 0 (0 = off), got {self.lora_rank}")
        if self.lora_rank == 0:
            changed = [k for k in ("lora_alpha", "lora_dropout") if getattr(self, k) != defaults[k]] + (["lora_target_modules"] if self.lora_target_modules else [])
            if changed:
                raise ConfigError(f"{', '.join(changed)} set but lora_rank=0 (LoRA off); set lora_rank > 0 to train adapters")
        else:
            if self.estimator == "gae":
                raise ConfigError("lora_rank > 0 with estimator=gae: the critic would need its own adapter, which is not supported; use full fine-tuning (lora_rank=0) or a critic-free estimator")
            if self.ref_model is not None:
                raise ConfigError("lora_rank > 0 with ref_model set: with LoRA the reference is the base model with adapters disabled; unset ref_model")
            if not 0 <= self.lora_dropout < 1:
                raise ConfigError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.ref_update_every and (self.lora_rank or self.fsdp):
            key = "lora_rank > 0" if self.lora_rank else "fsdp=true"
            raise ConfigError(f"ref_update_every with {key}: refreshing the reference is supported for full fine-tuning without sharding only")
        if self.fsdp and (self.dynamic_filtering or self.reward_on_error == "drop"):
            key = "dynamic_filtering=true" if self.dynamic_filtering else "reward_on_error=drop"
            raise ConfigError(f"fsdp=true with {key}: sharded forwards need the same number of responses on every rank, which dropping groups breaks")

    def _validate_async(self) -> None:
        """Asynchronous rollouts and the off-policy correction, before any model loads."""
        from ..core import check_rollout_correction
        from ..engines import get_engine

        if self.async_rollouts < 0:
            raise ConfigError(f"async_rollouts must be >= 0 (0 = synchronous), got {self.async_rollouts}")
        if self.partial_rollouts and not self.async_rollouts:
            raise ConfigError("partial_rollouts=true continues generations across weight updates of asynchronous rollouts; "
                              "set async_rollouts >= 1")
        mode, low, high = self.resolved_rollout_correction, self.rollout_correction_low, self.rollout_correction_high
        if mode == "none" and (low is not None or high != 2.0):
            raise ConfigError("rollout_correction_low/high are set but rollout_correction=none: set rollout_correction=truncate or mask")
        if not (math.isfinite(high) and high > 0):
            raise ConfigError(f"rollout_correction_high must be a finite number > 0, got {high}")
        if low is not None and mode != "mask":
            raise ConfigError(f"rollout_correction_low={low} applies to rollout_correction=mask only (truncate caps from above)")
        if mode == "mask" and not ((low or 0.0) <= 1.0 <= high):
            raise ConfigError(f"rollout_correction_low={low} and rollout_correction_high={high} must bracket 1 (an on-policy "
                              "token's weight): low <= 1 <= high")
        bounds = {"low": low, "high": high if mode != "none" else None}
        try:
            check_rollout_correction(mode, self.rollout_correction_level, **bounds)
        except ValueError as e:
            raise ConfigError(f"rollout_correction={mode}, rollout_correction_level={self.rollout_correction_level}: {e}") from None
        engine = get_engine(self.engine)
        if mode != "none" and not engine.logprobs:
            raise ConfigError(f"rollout_correction={mode} needs the log-probs the engine sampled with, and engine {self.engine!r} "
                              "does not report them: set rollout_correction=none")
        if self.async_rollouts and not engine.seeded:
            raise ConfigError(f"async_rollouts needs an engine that draws from its own seed; engine {self.engine!r} draws from "
                              "the generator the trainer uses: use engine=hf or vllm")
        if self.async_rollouts and self.vllm_sleep:
            raise ConfigError("async_rollouts keeps vLLM generating while the trainer updates; vllm_sleep=true would put it to "
                              "sleep then: set vllm_sleep=false")

    def _validate_natural(self) -> None:
        """``trust_region=natural`` and the options it cannot honour, before any model loads."""
        if self.trust_region != "natural":
            return
        critic = get_estimator(self.estimator).needs_critic
        refusals = {
            "fsdp=true": self.fsdp,
            f"entropy_coef={self.entropy_coef} (the natural step follows mean(ratio * A) alone, as TRPO)": self.entropy_coef != 0,
            f"dual_clip={self.dual_clip} (an option of the clipped ratio)": self.dual_clip is not None,
            "importance_sampling_level=sequence": self.importance_sampling_level != "token",
            f"torch_compile={self.torch_compile} (the natural step runs the plain policy)": self.torch_compile in ("update", "all"),
            f"epochs={self.epochs} / mini_batch_size={self.mini_batch_size} (one natural step per rollout; they apply to a "
            "critic, and this estimator has none)": not critic and (self.epochs != 1 or self.mini_batch_size is not None),
        }
        for what, refused in refusals.items():
            if refused:
                raise ConfigError(f"trust_region=natural cannot honour {what}: use trust_region=clip, or drop it")

    def _validate_losses(self) -> None:
        """The policy loss, its own options (refused under another loss), distillation, the task's knobs."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        owners = {"cispo": ("cispo_eps_low", "cispo_eps_high"), "clip_cov": ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub"),
                  "kl_cov": ("kl_cov_ratio", "kl_cov_coef")}
        for loss, keys in owners.items():
            changed = [k for k in keys if getattr(self, k) != defaults[k]]
            if changed and self.policy_loss != loss:
                raise ConfigError(f"{changed[0]} is set but policy_loss={self.policy_loss}; it applies to policy_loss={loss} only")
        if self.policy_loss != "ppo":
            for what, on in (("dual_clip", self.dual_clip is not None), ("importance_sampling_level=sequence", self.importance_sampling_level != "token"),
                             ("trust_region=natural", self.trust_region != "clip")):
                if on:
                    raise ConfigError(f"policy_loss={self.policy_loss} with {what}: that goes with policy_loss=ppo only")
        if self.cispo_eps_high <= 0 or (self.cispo_eps_low is not None and not 0 < self.cispo_eps_low <= 1):
            raise ConfigError(f"need cispo_eps_high > 0 and 0 < cispo_eps_low <= 1 (or None), got {self.cispo_eps_high}, {self.cispo_eps_low}")
        if not 0 < self.clip_cov_ratio <= 1 or self.clip_cov_lb >= self.clip_cov_ub or not 0 < self.kl_cov_ratio <= 1 or self.kl_cov_coef < 0:
            raise ConfigError("need 0 < clip_cov_ratio <= 1, clip_cov_lb < clip_cov_ub, 0 < kl_cov_ratio <= 1 and kl_cov_coef >= 0")
        if self.teacher is not None and not get_estimator(self.estimator).kl_in_reward:
            raise ConfigError(f"teacher={self.teacher}: the distillation reward is per token, and estimator {self.estimator!r} "
                              "broadcasts one advantage per response: use reinforce_pp, reinforce_pp_baseline, reinforce or gae")
        if self.teacher is None and self.teacher_coef != 1.0:
            raise ConfigError("teacher_coef is set but teacher is not: name the teacher model with teacher=PATH")
        if self.task_size < 1 or self.reward_noise < 0:
            raise ConfigError(f"need task_size >= 1 and reward_noise >= 0, got {self.task_size}, {self.reward_noise}")

    @property
    def resolved_rollout_correction(self) -> str:
        """``rollout_correction``, with None resolved: truncate with asynchronous rollouts, else none."""
        if self.rollout_correction is not None:
            return self.rollout_correction
        return "truncate" if self.async_rollouts else "none"

    @classmethod
    def tiny(cls, **overrides) -> "LMConfig":
        """The built-in job's preset: the tiny model on a built-in task, sized to learn in
        minutes on a laptop CPU (with ``lora_rank > 0``: ``lr=2e-3``)."""
        preset = dict(
            total_steps=60, prompts_per_step=32, samples_per_prompt=8, micro_batch_size=64,
            lr=3e-4, max_new_tokens=8, kl_coef=0.01, eval_every=10, eval_samples=8, torch_threads=1,
            sft_steps=1000, sft_lr=3e-3, sft_wrong_fraction=0.75,
        )
        if overrides.get("task") == "tools":  # two turns (a 21-token call, then the answer): longer episodes, fewer prompts
            preset.update(max_new_tokens=24, prompts_per_step=16, total_steps=40, max_turns=3, eval_max_prompts=100, sft_steps=1500, sft_wrong_fraction=0.6)
        if overrides.get("train_data") not in (None, "None", "none", "") or overrides.get("eval_data") not in (None, "None", "none", ""):
            # your data on the tiny model: its warm start imitates the built-in tasks' demonstrations only
            preset.update(sft_steps=0, sft_wrong_fraction=0.0)
        if int(overrides.get("lora_rank", 0) or 0) > 0:
            preset["lr"] = 2e-3  # adapters want a larger step than full fine-tuning (docs/lm.md, LoRA)
        return cls.from_dict({**preset, **overrides})

    # --- derived sizes (computed in one place) ---------------------------------------------------
    @property
    def rollout_size(self) -> int:
        """Responses per step: ``prompts_per_step * samples_per_prompt``."""
        return self.prompts_per_step * self.samples_per_prompt

    @property
    def mini_batch_responses(self) -> int:
        return self.mini_batch_size or self.rollout_size

    @property
    def on_policy(self) -> bool:
        """One epoch of one mini-batch: the update starts at the generating policy, so
        ``old_logprobs`` equal the update's own log-probs (detached) and need no extra pass."""
        return self.epochs == 1 and self.mini_batch_responses == self.rollout_size

    @property
    def resolved_kl_placement(self) -> str:
        if self.kl_placement is not None:
            return self.kl_placement
        return get_estimator(self.estimator).default_kl_placement

    @property
    def effective_kl_placement(self) -> str:
        """Where the KL term goes in this run: ``none`` when beta is 0 (fixed, or adaptive from 0:
        it stays 0), so that no reference loads and no reference forward runs; otherwise
        :attr:`resolved_kl_placement`."""
        return "none" if self.kl_coef == 0 else self.resolved_kl_placement

    @property
    def resolved_kl_estimator(self) -> KLEstimatorName:
        if self.kl_estimator is not None:
            return self.kl_estimator
        return "k1" if self.resolved_kl_placement == "reward" else "k3"

    @property
    def resolved_loss_agg(self) -> LossAgg:
        return cast(LossAgg, self.loss_agg or get_estimator(self.estimator).default_loss_agg)

    @property
    def builtin_task(self) -> Optional[str]:
        """The built-in task this config runs: ``task``, or ``sort`` when no data is given;
        None for your own data. (A ``Trainer`` given datasets in Python runs no built-in task.)"""
        if self.task is not None:
            return self.task
        return "sort" if self.train_data is None and self.eval_data is None else None

    def resolved(self) -> dict:
        """The config with every None-means-default choice written out (saved in the run)."""
        d = self.to_dict()
        d.update(task=self.builtin_task, kl_placement=self.resolved_kl_placement, kl_estimator=self.resolved_kl_estimator,
                 loss_agg=self.resolved_loss_agg, rollout_correction=self.resolved_rollout_correction)
        return d

    def validate(self) -> None:
        super().validate()
        if self.rollout_urls and self.engine == "hf":  # LMConfig(rollout_urls=...): the default engine becomes remote
            self.engine = "remote"
        spec = get_estimator(self.estimator) if self.estimator in ESTIMATORS else None
        if spec is None:
            raise ConfigError(f"unknown estimator {self.estimator!r}; valid: {', '.join(sorted(ESTIMATORS))}")
        if not self.remote_timeout > 0 or self.remote_retries < 0 or self.remote_concurrency < 1 or self.remote_batch_size < 1:
            raise ConfigError(f"need remote_timeout > 0, remote_retries >= 0, remote_concurrency >= 1 and remote_batch_size >= 1, got {self.remote_timeout}, {self.remote_retries}, {self.remote_concurrency}, {self.remote_batch_size}")
        positive = ("max_turns", "max_observation_tokens", "total_steps", "prompts_per_step", "samples_per_prompt", "micro_batch_size", "epochs", "max_new_tokens", "max_filter_rounds", "eval_samples", "logprob_chunk_size")
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        non_negative = ("save_every", "eval_every", "log_samples_every", "num_logged_samples", "warmup_steps", "sft_steps", "top_k",
                        "torch_threads", "weight_decay", "entropy_coef", "overlong_penalty", "truncation_penalty")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "critic_lr", "sft_lr", "max_grad_norm", "reward_clip", "eval_temperature"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_prompt_length < 1 or self.sft_batch_size < 1 or self.kl_horizon < 1:
            raise ConfigError("max_prompt_length, sft_batch_size and kl_horizon must be >= 1")
        if not 0 <= self.lr_min_ratio <= 1:
            raise ConfigError(f"lr_min_ratio must be in [0, 1], got {self.lr_min_ratio}")
        if spec.needs_groups and self.samples_per_prompt < 2:
            raise ConfigError(f"estimator {self.estimator!r} compares samples of one prompt: it needs samples_per_prompt >= 2, got {self.samples_per_prompt}")
        if self.rollout_size % self.mini_batch_responses:
            raise ConfigError(f"mini_batch_size={self.mini_batch_responses} does not divide the rollout of prompts_per_step x samples_per_prompt = {self.rollout_size} responses")
        if self.micro_batch_tokens is not None and self.micro_batch_tokens < 2:
            raise ConfigError(f"micro_batch_tokens must be >= 2 (a prompt token and a response token), got {self.micro_batch_tokens}")
        if self.micro_batch_tokens is None and self.mini_batch_responses % self.micro_batch_size and self.mini_batch_responses > self.micro_batch_size:
            raise ConfigError(f"micro_batch_size={self.micro_batch_size} does not divide mini_batch_size={self.mini_batch_responses}")
        placement = self.resolved_kl_placement
        if self.dynamic_filtering and self.samples_per_prompt < 2:
            raise ConfigError("dynamic_filtering drops groups whose samples all have the same reward; with samples_per_prompt=1 every group would be dropped: set samples_per_prompt >= 2 or dynamic_filtering=false")
        if self.kl_estimator == "k3+" and placement != "loss":
            raise ConfigError(f"kl_estimator=k3+ differs from k3 only in its gradient, which exists only with kl_placement=loss (here {placement})")
        if self.scale_rewards != "group" and self.estimator != "grpo":
            raise ConfigError(f"scale_rewards={self.scale_rewards} applies to estimator grpo only (here {self.estimator!r}, whose normalisation is fixed)")
        if self.ref_update_every < 0 or not 0 < self.ref_update_alpha <= 1:
            raise ConfigError(f"need ref_update_every >= 0 and 0 < ref_update_alpha <= 1, got {self.ref_update_every}, {self.ref_update_alpha}")
        if self.ref_update_every and placement == "none":
            raise ConfigError("ref_update_every refreshes the reference, but kl_placement=none loads none")
        if self.ref_update_every and self.ref_model is not None and self.ref_model.startswith(("http://", "https://")):
            raise ConfigError("ref_update_every refreshes a local reference from the policy; a served reference (ref_model=URL) cannot be refreshed")
        if placement == "reward" and not spec.kl_in_reward:
            raise ConfigError(f"estimator {self.estimator!r} broadcasts one advantage per response and cannot carry KL in the reward; use kl_placement=loss or none")
        if spec.needs_critic is False and self.critic_model is not None:
            raise ConfigError(f"critic_model is set but estimator {self.estimator!r} trains no critic (only 'gae' does)")
        if self.estimator == "reinforce_pp_baseline" and self.gamma != 1.0:
            raise ConfigError(f"reinforce_pp_baseline uses gamma = 1; got gamma={self.gamma}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            raise ConfigError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.eps_low <= 0 or self.eps_low >= 1 or self.eps_high <= 0:
            raise ConfigError(f"need 0 < eps_low < 1 and eps_high > 0, got {self.eps_low}, {self.eps_high}")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ConfigError(f"dual_clip must be > 1, got {self.dual_clip}")
        self._validate_async()
        self._validate_natural()
        self._validate_losses()
        if self.kl_coef < 0 or (self.kl_target is not None and self.kl_target <= 0):
            raise ConfigError("kl_coef must be >= 0 and kl_target > 0")
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"need temperature > 0 and 0 < top_p <= 1, got {self.temperature}, {self.top_p}")
        if self.reward_weights and self.reward_funcs and len(self.reward_weights) != len(self.reward_funcs):  # Python-API reward_funcs: checked by the Trainer
            raise ConfigError(f"{len(self.reward_weights)} reward_weights for {len(self.reward_funcs)} reward_funcs")
        if self.reward_timeout is not None and not self.reward_timeout > 0:
            raise ConfigError(f"reward_timeout must be > 0 seconds (or None), got {self.reward_timeout}")
        if self.reward_step_delimiter == "":
            raise ConfigError("reward_step_delimiter must be a non-empty string (or None)")
        if self.share_prompt and self.gradient_checkpointing:
            raise ConfigError("share_prompt reuses the prompt's key/value cache, which gradient checkpointing does not keep; set share_prompt=false")
        if self.torch_compile in ("decode", "all") and self.engine != "hf":
            raise ConfigError(f"torch_compile={self.torch_compile} compiles the hf engine's decoding step; engine={self.engine} samples another way: use torch_compile=update or engine=hf")
        if self.torch_compile in ("update", "all") and self.fsdp:
            raise ConfigError(f"torch_compile={self.torch_compile} with fsdp=true is not supported here (untested); use torch_compile=decode or torch_compile=off")
        self._validate_scale()
        if not 0 <= self.sft_wrong_fraction <= 1:
            raise ConfigError(f"sft_wrong_fraction must be in [0, 1], got {self.sft_wrong_fraction}")
        if self.task is not None and (self.train_data is not None or self.eval_data is not None):
            given = ", ".join(f"{k}={getattr(self, k)}" for k in ("train_data", "eval_data") if getattr(self, k) is not None)
            raise ConfigError(f"task={self.task} is a built-in task with its own generated data; it cannot be combined with {given}: drop task, or the data")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.overlong_buffer < 0 or self.overlong_buffer > self.max_new_tokens:
            raise ConfigError(f"overlong_buffer must be in [0, max_new_tokens={self.max_new_tokens}], got {self.overlong_buffer}")
        if self.resolved_kl_estimator not in KL_ESTIMATORS or self.resolved_loss_agg not in LOSS_AGGS:
            raise ConfigError(f"estimator {self.estimator!r} declares an invalid default")
        check_engine_config(self)

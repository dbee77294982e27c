"""Typed run configuration: YAML + dotted overrides → validated objects.

One name per concept, the same in YAML, code, metrics and docs. Every section forbids unknown
keys; errors name the full dotted key, say what is valid and suggest the nearest known key.
Derived sizes (per-process batch shares) are pure functions of (config, world size).
"""

from __future__ import annotations

import difflib
import math
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from kltrain.divergence.estimators import EstimatorName, Placement
from kltrain.divergence.functions import get_divergence

# One list of valid names per concept: the modules that implement them take their names from
# these Literals, and tests/test_config.py checks that the registries agree.
DTypeName = Literal["fp32", "bf16", "fp16"]
ChatTemplateMode = Literal["auto", "on", "off"]
AlgorithmName = Literal["rloo", "grpo", "ppo", "fdpg"]
#: Validated against kltrain.divergence.functions at load time (a built-in or "module:f").
DivergenceName = str


class ConfigError(ValueError):
    """A config problem, phrased for the user: names the key and what would be valid."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Section):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = "all-linear"


class ModelConfig(Section):
    policy: str = "smollm2-135m"
    """Short name of an embedded model, a Hugging Face hub id, or a local folder."""
    reference: str | None = None
    """Defaults to the policy's starting weights. Must share the policy's tokenizer."""
    dtype: DTypeName = "fp32"
    reference_dtype: DTypeName | None = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    lora: LoraConfig | None = None
    """With LoRA the reference is the base model with the adapter disabled (one copy in memory)."""
    dropout: bool = False
    """Keep the models' dropout active in training forwards. Off (default, as TRL): every
    forward of the policy, reference and value model is then deterministic, so the sampled
    policy is the one differentiated and policy = reference gives divergence 0 at step 1."""


class DataConfig(Section):
    prompts: str = "builtin:movie_reviews"
    """`builtin:<name>`, a local .jsonl/.json/.csv/.parquet file, or a hub dataset id."""
    split: str = "train"
    prompt_column: str = "prompt"
    chat_template: ChatTemplateMode = "auto"
    max_prompt_tokens: int = Field(128, gt=0)
    on_long_prompt: Literal["truncate", "skip", "error"] = "truncate"
    """A prompt longer than `max_prompt_tokens`: keep its end (counted per step as
    `data/truncated_prompts`), drop the row at start-up, or stop at start-up naming it."""
    shuffle: bool = True
    system_prompt: str | None = None
    heldout_prompts: int = Field(0, ge=0)
    """Prompts set aside for evaluation (``kltrain eval``, ``trainer.eval_every``): training never
    samples them. Chosen by ``heldout_seed``, not the run's seed, so every run of a sweep over
    seeds holds out the same prompts."""
    heldout_seed: int = 0

    @field_validator("chat_template", mode="before")
    @classmethod
    def _yaml_bool(cls, value: Any) -> Any:
        """YAML 1.1 reads an unquoted `off`/`on` as a boolean: take it as the word."""
        return {False: "off", True: "on"}.get(value, value) if isinstance(value, bool) else value


class GenerationConfig(Section):
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0.0)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_new_tokens: int = Field(0, ge=0)
    """Forbids EOS before this many tokens: a truncating sampler, refused for rloo, grpo, ppo
    (the loss and divergences are those of the untruncated policy)."""


class RewardTerm(Section):
    name: str
    """`sentiment`, `keyword`, `length`, `module:function` (TRL reward signature), or
    `model:<hub id or folder>` for a sequence-classification reward model."""
    weight: float = 1.0
    kwargs: dict[str, Any] = Field(default_factory=dict)
    transforms: list[dict[str, Any] | str] = Field(default_factory=list)
    """Applied in order to this term's scores: `logit`, `whiten`, `clip`, `scale`."""


class RewardConfig(Section):
    terms: list[RewardTerm] = Field(default_factory=lambda: [RewardTerm(name="sentiment")])
    on_invalid: Literal["error", "skip"] = "error"

    @field_validator("terms")
    @classmethod
    def _non_empty(cls, terms: list[RewardTerm]) -> list[RewardTerm]:
        if not terms:
            raise ValueError("needs at least one reward term, e.g. [{name: sentiment}]")
        return terms


class AdaptiveCoefConfig(Section):
    target: float = Field(gt=0.0)
    """Target per-sequence divergence (sum over tokens, mean over samples)."""
    horizon: float = Field(10000.0, gt=0.0)


class KLConfig(Section):
    divergence: DivergenceName = "reverse_kl"
    alpha: float | None = None
    """Parameter of the `alpha` divergence (α ∉ {0, 1})."""
    f_prime: str | None = None
    """For a user f given as `module:f`: its derivative as `module:fp` (else autograd)."""
    estimator: EstimatorName = "exact"
    placement: Placement = "loss"
    coef: float = Field(0.05, ge=0.0)
    """β. β = 0 keeps the reference (for metrics) but removes the divergence from the objective."""
    adaptive: AdaptiveCoefConfig | None = None
    accept_gradient: str | None = None
    """Opt in, by its key (e.g. `local forward_kl`), to an (estimator, placement) pair whose
    gradient is not that of `divergence`."""
    chunk_size: int = Field(1024, gt=0)
    """Tokens per chunk in the memory-lean lm_head path."""
    max: float | None = Field(None, gt=0.0)
    """Stop the run if the mean per-sequence divergence exceeds this."""
    importance_ratio: Literal["auto", "on", "detached", "off"] = "auto"
    """Weight a sampled estimator in the loss by w = π_θ/π_old (MATH.md, "Off-policy minibatches
    and the importance ratio"): `on` (gradient through w: the local gradient of the divergence
    the estimator is unbiased for), `detached` (the on-policy table at the current θ), `off`;
    `auto` picks the form whose gradient is that of `divergence` (kltrain/importance.py)."""

    @field_validator("importance_ratio", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        """YAML 1.1 reads a bare `on` / `off` as true / false: take them as the names written."""
        if isinstance(value, bool):
            return "on" if value else "off"
        return value

    def divergence_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.alpha is not None:
            params["alpha"] = self.alpha
        if self.f_prime is not None:
            params["f_prime"] = self.f_prime
        return params


class PPOConfig(Section):
    """``algorithm.ppo``: read only when ``algorithm.name`` is ``ppo`` (README, "PPO")."""

    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """GAE discount γ. 1.0 as in InstructGPT / lm-human-preferences and TRL."""
    lam: float = Field(0.95, ge=0.0, le=1.0)
    """GAE λ. 0.95 as in InstructGPT / lm-human-preferences and TRL."""
    value_coef: float = Field(0.1, gt=0.0)
    """Weight of the value loss in the total loss. 0.1 as TRL's ``vf_coef``."""
    value_clip_range: float | None = Field(0.2, gt=0.0)
    """ε of the clipped value loss, in reward units (None: unclipped). 0.2 as TRL's
    ``cliprange_value`` and lm-human-preferences."""
    whiten_advantages: bool = True
    """Standardise the GAE advantages over the batch's valid tokens. On in lm-human-preferences
    and TRL."""
    reward_clip: float | None = Field(None, gt=0.0)
    """Clamp the sequence reward R to [−c, c] before it enters the token rewards (None: off, as in
    InstructGPT, Llama 2 and TRL's ``score_clip``). Per-term clipping is the ``clip`` transform."""
    penalty_clip: float | None = Field(None, gt=0.0)
    """Clamp each token's reward penalty β·d_t to [−c, c] (reward units; None: off, as in
    InstructGPT, Llama 2 and TRL). Bounds k1's negative and large per-token values."""
    value_learning_rate: float | None = Field(None, gt=0.0)
    """Learning rate of the value function (None: ``trainer.learning_rate``). A zero-initialised
    head at a fine-tuning rate stays near 0 for many steps, and with λ < 1 GAE then credits late
    tokens more than early ones whatever the reward; a higher rate lets V catch up quickly."""
    value_trunk_gradient: bool = False
    """With the value head on the policy: whether the value loss's gradient flows into the
    shared trunk. Off by default: the head then learns on the policy's features without the value
    loss moving the policy itself (a young value head's noisy targets otherwise push the policy
    away from the reference with no gain in reward; seen on the embedded model)."""
    value_model: str | None = None
    """None: a linear value head on the policy's final hidden states (shared trunk, as TRL's
    value head). A model name (embedded short name, hub id or folder): a separate value model, its
    own transformer trunk plus a linear head, trained with the policy's optimizer."""


FdpgTarget = Literal["rlhf", "constraint", "moments"]
#: Divergences to the f-DPG target estimated every step (and the trained one if not among them).
DIAGNOSED_DIVERGENCES = ("forward_kl", "reverse_kl", "tv", "js")


class FdpgConfig(Section):
    """f-DPG (`algorithm.name: fdpg`): minimise D_f(π‖p) toward a target p (kltrain/targets.py)."""

    target: FdpgTarget = "rlhf"
    """`rlhf`: π_ref·exp(R/β), β = kl.coef; `constraint`: π_ref·b, b = product of the reward
    terms (each 0/1); `moments`: π_ref·exp(λ·φ), φ_k = reward term k, E_p[φ] = `moments`."""
    epsilon: float = Field(0.0, ge=0.0, lt=1.0)
    """Softened constraint b_ε = ε + (1 − ε)·b (needed by reverse_kl, chi2, alpha α > 1)."""
    moments: list[float] | None = None
    """Target moments μ, one per reward term (target `moments` only)."""
    lambdas: list[float] | None = None
    """Initial λ, one per reward term; by default fitted on the first step's samples (π_ref)."""
    refit_every: int = Field(0, ge=0)
    """Refit λ every N steps on the last `refit_window` steps' samples (0: never)."""
    refit_window: int = Field(4, ge=1)
    z_rate: float | None = Field(None, gt=0.0, le=1.0)
    """Per-prompt Z moving average: None = mean of all weights seen, else EMA weight."""
    weight_clip: float | None = Field(None, gt=1.0)
    """Clip the importance weight p(y)/π(y) of the pseudo-reward at this value (biased)."""
    baseline: Literal["leave_one_out", "none"] = "leave_one_out"
    proposal: Literal["policy", "offline"] = "policy"
    """Who samples: `policy` (on-policy), or `offline` (DPG's offline variant): a frozen copy q
    of the policy, importance-weighted by π/q, replaced by the policy only when the policy's
    estimated `proposal_divergence` to the target is lower than q's (one more model copy)."""
    proposal_divergence: str = "tv"
    """The divergence D(·‖p) compared by the offline proposal's update rule (any of
    `forward_kl`, `reverse_kl`, `tv`, `js`, or the trained `kl.divergence`)."""


class AlgorithmConfig(Section):
    name: AlgorithmName = "rloo"
    num_generations: int = Field(4, ge=1)
    """Samples per prompt (k). RLOO and GRPO need k ≥ 2."""
    epochs: int = Field(1, ge=1)
    """Optimisation passes over each rollout batch."""
    num_minibatches: int = Field(1, ge=1)
    """Each pass is split into this many shuffled minibatches, one optimizer step each."""
    clip_range: float = Field(0.2, gt=0.0)
    scale_rewards: bool = True
    """GRPO: divide by the group's reward std (Dr. GRPO sets this off)."""
    # PPO (issue 4) and f-DPG (issue 5) add their keys here.
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    """PPO's own keys (``algorithm.ppo.*``); an error with any other algorithm."""
    fdpg: FdpgConfig | None = None
    """f-DPG's settings (defaults when `name: fdpg` and this is absent)."""


class TrackingWandbConfig(Section):
    mode: Literal["offline", "online", "disabled"] = "offline"
    project: str = "kltrain"
    group: str | None = None
    tags: list[str] = Field(default_factory=list)
    run_name: str | None = None


class TrackingConfig(Section):
    wandb: TrackingWandbConfig = Field(default_factory=TrackingWandbConfig)
    progress: bool = True


class TrainerConfig(Section):
    max_steps: int = Field(20, ge=1)
    prompts_per_step: int = Field(8, ge=1)
    """Global number of prompts per step (across processes); samples = prompts × k."""
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per forward/backward on one process (gradient accumulation fills the rest)."""
    generation_batch_size: int | None = Field(None, ge=1)
    learning_rate: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    warmup_steps: int = Field(0, ge=0)
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    output_dir: str | None = None
    """Default: runs/<name>-<timestamp>."""
    save_every: int = Field(0, ge=0)
    """Checkpoint every N steps (0: only at the end)."""
    keep_last: int = Field(2, ge=1)
    """Complete checkpoints kept; older ones are deleted only after a newer one is complete."""
    resume: str | None = None
    """`auto`: continue from the newest complete checkpoint in `output_dir` (a fresh start when
    there is none yet); a path: from that checkpoint (or that run folder's newest)."""
    max_consecutive_skips: int = Field(3, ge=1)
    """Stop the run after this many optimizer updates in a row skipped for a non-finite loss or
    gradient norm."""
    log_samples_every: int = Field(5, ge=0)
    eval_every: int = Field(0, ge=0)
    """Every N steps, evaluate on the ``data.heldout_prompts`` split and log ``eval/*`` (as
    ``kltrain eval``; 0: never)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"


class RunConfig(Section):
    name: str = "run"
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    kl: KLConfig = Field(default_factory=KLConfig)
    algorithm: AlgorithmConfig = Field(default_factory=AlgorithmConfig)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _cross_field(self) -> RunConfig:
        _validate_divergence(self.kl)
        algo = self.algorithm
        if algo.name in ("rloo", "grpo") and algo.num_generations < 2:
            raise ValueError(
                f"algorithm.num_generations must be ≥ 2 for {algo.name} (its baseline compares "
                f"samples of the same prompt); got {algo.num_generations}"
            )
        if samples_per_step(self) % algo.num_minibatches:
            raise ValueError(
                f"algorithm.num_minibatches={algo.num_minibatches} does not divide the "
                f"{samples_per_step(self)} sequences per step (trainer.prompts_per_step × "
                f"algorithm.num_generations)"
            )
        _validate_ppo(self)
        if self.trainer.eval_every and not self.data.heldout_prompts:
            raise ValueError(
                f"trainer.eval_every={self.trainer.eval_every} evaluates on held-out prompts: set "
                f"data.heldout_prompts (e.g. 16) so that training leaves some out, or set "
                f"trainer.eval_every=0"
            )
        _validate_sampler(self)
        _validate_dropout(self.model)
        if algo.name == "fdpg" or algo.fdpg is not None:
            validate_fdpg_config(self)
        return self

    def resolved_output_dir(self) -> Path:
        if self.trainer.output_dir:
            return Path(self.trainer.output_dir)
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        return Path("runs") / f"{self.name}-{stamp}"


def _validate_ppo(cfg: RunConfig) -> None:
    """PPO credits the divergence through the reward; ``algorithm.ppo`` only applies to PPO
    (its defaults are accepted anywhere, so a resolved config.yaml of any run loads back)."""
    algo = cfg.algorithm
    if algo.name != "ppo":
        if algo.ppo != PPOConfig():
            raise ValueError(
                f"algorithm.ppo is only read by algorithm.name=ppo, not {algo.name}; remove it"
            )
        return
    if cfg.kl.placement == "loss":
        raise ValueError(
            "kl.placement=loss is not valid with algorithm.name=ppo: PPO puts the divergence in "
            "the reward (r_t = −β·d_t, credited by GAE). Use kl.placement=reward (InstructGPT, "
            "Llama 2) or both (also β·d_t in the loss; with kl.estimator=exact the full gradient)"
        )


#: The RL algorithms train the policy they sample from (temperature-scaled: π^(1/T)); f-DPG
#: has its own, stricter rule (kltrain/targets.py).
_TRUNCATING = {
    "top_k": (0, "keeps only the k most likely tokens"),
    "top_p": (1.0, "keeps only the most likely tokens up to probability p"),
    "min_new_tokens": (0, "forbids EOS before that many tokens"),
}


def _validate_sampler(cfg: RunConfig) -> None:
    """Refuse truncating samplers for rloo/grpo/ppo: the loss and the divergences are computed
    for the untruncated (tempered) policy, so a sampler that never draws some tokens lets the
    policy move mass onto them at no cost in reward (MATH.md, "The sampling distribution must
    be the differentiated one")."""
    if cfg.algorithm.name not in ("rloo", "grpo", "ppo"):
        return
    for key, (neutral, what) in _TRUNCATING.items():
        value = getattr(cfg.generation, key)
        if value != neutral:
            raise ValueError(
                f"generation.{key}={value} {what}, but {cfg.algorithm.name} computes its loss and "
                f"divergences for the untruncated policy, so the samples would not come from the "
                f"distribution it differentiates (MATH.md, 'The sampling distribution must be "
                f"the differentiated one'). Set generation.{key}={neutral}; "
                f"generation.temperature is allowed (the tempered policy is trained)."
            )


def _validate_dropout(model: ModelConfig) -> None:
    if not model.dropout and model.lora is not None and model.lora.dropout > 0:
        raise ValueError(
            f"model.lora.dropout={model.lora.dropout} but model.dropout=false turns dropout off "
            "in every forward; set model.lora.dropout=0, or model.dropout=true to keep both"
        )


def _validate_divergence(kl: KLConfig) -> None:
    """Resolve the divergence now, so a bad name or parameter fails at load time."""
    try:
        get_divergence(kl.divergence, **kl.divergence_params())
    except Exception as err:  # a user f's module may raise anything while importing
        raise ValueError(f"kl.divergence: {type(err).__name__}: {err}") from err


# ----------------------------------------------------------------------------------------------
# f-DPG rules (called by RunConfig's validator; each message names the key and what is valid)


def validate_fdpg_config(cfg) -> None:
    """Refuse settings that do not apply under ``algorithm.name: fdpg`` instead of ignoring them."""
    algo, kl, gen = cfg.algorithm, cfg.kl, cfg.generation
    if algo.name != "fdpg":
        raise ValueError(
            f"algorithm.fdpg is set but algorithm.name={algo.name!r}; set algorithm.name=fdpg "
            f"or remove algorithm.fdpg"
        )
    fd = algo.fdpg or FdpgConfig()
    _check_kl(kl)
    _check_sampling(gen)
    if cfg.reward.on_invalid != "error":
        raise ValueError(
            "reward.on_invalid=skip is not supported by fdpg (a skipped sample would bias the "
            "importance-sampled Z); use reward.on_invalid=error"
        )
    if fd.baseline == "leave_one_out" and algo.num_generations < 2:
        raise ValueError(
            "algorithm.fdpg.baseline=leave_one_out needs algorithm.num_generations ≥ 2 "
            f"(got {algo.num_generations}); or set algorithm.fdpg.baseline=none"
        )
    _check_target(cfg, fd)
    _check_proposal(cfg, fd)


def _check_proposal(cfg, fd) -> None:
    """The offline proposal's update rule compares a divergence the diagnostics estimate."""
    allowed = sorted({*DIAGNOSED_DIVERGENCES, cfg.kl.divergence})
    name = fd.proposal_divergence
    if name not in allowed:
        raise ValueError(
            f"algorithm.fdpg.proposal_divergence={name!r}: the update rule compares one of the "
            f"estimated divergences to the target, {allowed}"
        )
    hard = fd.target == "constraint" and fd.epsilon == 0
    params = cfg.kl.divergence_params() if name == cfg.kl.divergence else {}
    if hard and get_divergence(name, **params).f_prime_at_infinity() == float("inf"):
        raise ValueError(
            f"algorithm.fdpg.proposal_divergence={name}: infinite toward a hard constraint while "
            f"a sample violates it, so the update rule could not compare; use tv, js or forward_kl"
        )


def _check_kl(kl) -> None:
    why = (
        "under algorithm.name=fdpg the divergence is the sequence-level objective D_f(π‖p), "
        "estimated from sequence log-probs (MATH.md, f-DPG), not a per-token regulariser"
    )
    if kl.estimator != "exact" or kl.placement != "loss":
        raise ValueError(
            f"kl.estimator={kl.estimator} / kl.placement={kl.placement}: {why}; leave both at "
            f"their defaults (exact, loss)"
        )
    if kl.adaptive is not None:
        raise ValueError(f"kl.adaptive: {why}, and β defines the target; remove kl.adaptive")
    if kl.accept_gradient is not None:
        raise ValueError(f"kl.accept_gradient: {why}; remove it")


def _check_sampling(gen) -> None:
    changed = {
        "generation.temperature": (gen.temperature, 1.0),
        "generation.top_k": (gen.top_k, 0),
        "generation.top_p": (gen.top_p, 1.0),
        "generation.min_new_tokens": (gen.min_new_tokens, 0),
    }
    for key, (value, needed) in changed.items():
        if value != needed:
            raise ValueError(
                f"{key}={value}: fdpg's importance weights need samples drawn from π itself; "
                f"set {key}={needed}"
            )


def _check_target(cfg, fd) -> None:
    terms = cfg.reward.terms
    if fd.target != "constraint" and fd.epsilon:
        raise ValueError("algorithm.fdpg.epsilon softens a constraint; it needs target=constraint")
    if fd.target != "moments":
        for key in ("moments", "lambdas"):
            if getattr(fd, key) is not None:
                raise ValueError(f"algorithm.fdpg.{key} needs target=moments")
        if fd.refit_every:
            raise ValueError("algorithm.fdpg.refit_every needs target=moments")
    if fd.target == "rlhf":
        if cfg.kl.coef <= 0:
            raise ValueError("kl.coef (β of the target π_ref·exp(R/β)) must be > 0 for target rlhf")
        return
    if "coef" in cfg.kl.model_fields_set:
        raise ValueError(
            f"kl.coef is β of target rlhf; target {fd.target} does not use it: remove kl.coef"
        )
    for i, term in enumerate(terms):
        if term.weight != 1.0:
            raise ValueError(
                f"reward.terms[{i}].weight={term.weight}: target {fd.target} uses each term "
                f"as is (a 0/1 constraint or a feature φ_k); remove the weight"
            )
    if fd.target == "constraint":
        divergence = get_divergence(cfg.kl.divergence, **cfg.kl.divergence_params())
        if fd.epsilon == 0 and not math.isfinite(divergence.f_prime_at_infinity()):
            raise ValueError(
                f"kl.divergence={divergence.name} toward target constraint: D_f(π‖p) is infinite "
                f"while the policy gives any probability to completions that violate the "
                f"constraint (f'(∞) = ∞, MATH.md). Set algorithm.fdpg.epsilon in (0, 1) to soften "
                f"the target (b_ε = ε + (1 − ε)·b), or use forward_kl, js, tv, hellinger or alpha "
                f"with α < 1"
            )
        return
    if fd.moments is None or len(fd.moments) != len(terms):
        raise ValueError(
            f"algorithm.fdpg.moments: target moments needs one target moment per reward term "
            f"({len(terms)}); got {fd.moments}"
        )
    if fd.lambdas is not None and len(fd.lambdas) != len(terms):
        raise ValueError(
            f"algorithm.fdpg.lambdas: one λ per reward term ({len(terms)}); got {fd.lambdas}"
        )


# ----------------------------------------------------------------------------------------------
# Derived sizes: pure functions of (config, world size)


def samples_per_step(cfg: RunConfig) -> int:
    """Global sequences per step: prompts × samples per prompt."""
    return cfg.trainer.prompts_per_step * cfg.algorithm.num_generations


def prompts_per_process(cfg: RunConfig, world_size: int) -> int:
    """Each process's share of the step's prompts; the global count must split evenly."""
    total = cfg.trainer.prompts_per_step
    if total % world_size:
        raise ConfigError(
            f"trainer.prompts_per_step={total} does not split evenly over {world_size} processes; "
            f"use a multiple of {world_size}"
        )
    return total // world_size


# ----------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read YAML (if given), apply `a.b.c=value` overrides (values parsed as YAML), validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from err
        if raw is None:
            raise ConfigError(
                f"{path} is empty; a config names at least the model to train, e.g. "
                f"`model: {{policy: smollm2-135m}}` (configs/quickstart.yaml is a complete one)"
            )
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides or []:
        apply_override(raw, item)
    source = str(path) if path else "<overrides>"
    return config_from_dict(raw, source=source, overrides=overrides)


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`0.05`, `[a, b]`)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(value) if value.strip() else None


def config_from_dict(
    raw: dict[str, Any], source: str = "<config>", overrides: list[str] | None = None
) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_errors(err, source, overrides or [])) from None


def _format_errors(err: ValidationError, source: str, overrides: list[str]) -> str:
    """One line per error; a key set by a command-line override says so (the YAML file did not
    set it)."""
    from_override = {item.partition("=")[0].strip(): item for item in overrides}
    problems = err.errors()
    keys = [".".join(str(p) for p in e["loc"] if not isinstance(p, int)) for e in problems]
    all_overrides = bool(problems) and all(_override_for(k, from_override) for k in keys)
    lines = [f"{'command-line overrides' if all_overrides else source}: invalid config"]
    for e, plain in zip(problems, keys):
        key = ".".join(str(p) for p in e["loc"])
        item = _override_for(plain, from_override)
        origin = f" [from the override {item!r}]" if item else ""
        if e["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key{_suggest(e['loc'])}{origin}")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            where = key or "config"
            lines.append(f"  {where}: {e['msg']}{shown}{origin}")
    return "\n".join(lines)


def _override_for(key: str, from_override: dict[str, str]) -> str | None:
    """The override that set ``key`` (or a section above it), if any."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        item = from_override.get(".".join(parts[:n]))
        if item:
            return item
    return None


def _suggest(loc: tuple[Any, ...]) -> str:
    """'; did you mean `kl.divergence`?' for a misspelt key, from the section's fields."""
    model: Any = RunConfig
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return ""
        model = _section_type(field.annotation)
        if model is None:
            return ""
    names = list(getattr(model, "model_fields", {}))
    match = difflib.get_close_matches(str(loc[-1]), names, n=1, cutoff=0.6)
    prefix = ".".join(str(p) for p in loc[:-1] if not isinstance(p, int))
    if match:
        return f"; did you mean `{prefix + '.' if prefix else ''}{match[0]}`?"
    return f"; valid keys here: {', '.join(names)}"


def _section_type(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _section_type(arg)
        if found is not None:
            return found
    return None


def to_yaml(cfg: RunConfig, extra: dict[str, Any] | None = None) -> str:
    data = cfg.model_dump(mode="json")
    if extra:
        data = {**data, **extra}
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)

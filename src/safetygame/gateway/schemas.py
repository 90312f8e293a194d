"""OpenAI-shaped request and response bodies, plus the gateway's error envelope.

Requests are validated with pydantic; errors report field locations only, never the
submitted values (prompts must not reach logs or error bodies). Responses are plain dicts
in the ``ChatCompletion`` / ``ChatCompletionChunk`` shape with one extension field,
``safetygame``, holding the decision summary.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from safetygame.agent import Decision, Status
from safetygame.gateway.moderation import Moderation


class TextPart(BaseModel):
    """One part of a multi-part message content; only text parts are supported."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)

    def as_dict(self) -> dict[str, str]:
        # "developer" is the newer name of the system role in the OpenAI API.
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class SafetygameOptions(BaseModel):
    """The request extension: ``{"safetygame": {"budget": 0.05, "seed": 1}}``."""

    model_config = ConfigDict(extra="forbid")
    budget: float | None = Field(None, ge=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """``POST /v1/chat/completions``. Sampling knobs belong to the tenant's policy, so
    ``temperature``/``top_p`` are accepted for compatibility, not applied. Length limits are
    applied to every candidate, as a plain model would apply them to its answer:
    ``max_completion_tokens`` (else ``max_tokens``) lowers the policy's
    ``sampling.max_tokens`` (never raises it), ``stop`` (up to 4 sequences) ends each
    candidate. Features the gateway cannot honour (tools, n > 1) are rejected."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=200)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    seed: int | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    user: str | None = Field(None, max_length=256)
    tools: None = None
    tool_choice: None = None
    functions: None = None
    safetygame: SafetygameOptions = SafetygameOptions(budget=None, seed=None)

    @field_validator("messages")
    @classmethod
    def _last_is_user(cls, v: list[ChatMessage]) -> list[ChatMessage]:
        if v and v[-1].role != "user":
            raise ValueError("the last message must come from the user")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, v: str | list[str] | None) -> str | list[str] | None:
        seqs = [v] if isinstance(v, str) else (v or [])
        if len(seqs) > 4 or not all(0 < len(s) <= 200 for s in seqs):
            raise ValueError("stop takes at most 4 non-empty sequences of up to 200 characters")
        return v

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def length_limit(self) -> int | None:
        """The caller's limit on generated tokens (the newer field first)."""
        return self.max_completion_tokens or self.max_tokens


class ModerationRequest(BaseModel):
    """``POST /v1/moderations``: ``input`` is a string, a list of strings, or a list of
    ``{"type": "text", "text": ...}`` parts (image parts are rejected). ``model`` may be
    left out; if given it must be the gateway's model name."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = Field(None, min_length=1, max_length=200)
    input: list[str]

    @field_validator("input", mode="before")
    @classmethod
    def _texts(cls, v: Any) -> list[str]:
        if isinstance(v, str):
            return [v]
        shape = (
            "must be a string, a non-empty list of strings, or a non-empty list of "
            '{"type": "text", "text": ...} parts'
        )
        if not isinstance(v, list) or not v:
            raise ValueError(shape)
        out = []
        for item in v:
            if isinstance(item, str):
                out.append(item)
            elif isinstance(item, dict) and item.get("type") == "text":
                if set(item) != {"type", "text"} or not isinstance(item["text"], str):
                    raise ValueError(shape)
                out.append(item["text"])
            elif isinstance(item, dict) and item.get("type") == "image_url":
                raise ValueError("only text can be moderated here, not images")
            else:
                raise ValueError(shape)
        return out


def moderation_body(outcome: Moderation, model: str, request_id: str) -> dict[str, Any]:
    """OpenAI's moderation response, plus ``safetygame``: the rule, the budgets and the
    readings the verdict came from (scores of texts, never the texts)."""
    return {
        "id": f"modr-{request_id}",
        "model": model,
        "results": [
            {
                "flagged": r.flagged,
                "categories": r.categories,
                "category_scores": r.category_scores,
                "category_applied_input_types": {c: ["text"] for c in r.categories},
            }
            for r in outcome.results
        ],
        "safetygame": {
            "status": outcome.status,
            "rule": "categories[c] = score(text) - score(refusal) > budget[c]; "
            "category_scores[c] = that extra risk, clipped to [0, 1]",
            "budget": outcome.budget,
            "reference_scores": outcome.reference,
            "raw_scores": [r.raw for r in outcome.results],
            "errors": [list(r.errors) for r in outcome.results],
            "scorer": outcome.scorer,
            "relative": outcome.relative,
        },
    }


def error_body(
    message: str, type_: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The OpenAI error envelope."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _loc(parts: tuple[int | str, ...]) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "<root>"


def validation_error_body(exc: ValidationError) -> dict[str, Any]:
    """Locations and messages only: pydantic's ``input`` (the user's text) is dropped."""
    errors = exc.errors(include_input=False, include_url=False, include_context=False)
    locs = [_loc(tuple(e["loc"])) for e in errors]
    detail = "; ".join(f"{loc}: {e['msg']}" for loc, e in zip(locs, errors, strict=True))
    return error_body(
        f"Invalid request: {detail}",
        "invalid_request_error",
        param=locs[0] if locs else None,
        code="invalid_value",
    )


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def lone_surrogate_location(raw: bytes, payload: Any) -> str | None:
    """The location of a string (or key) holding a lone UTF-16 surrogate (``"\\ud800"``:
    valid JSON, but not encodable as UTF-8 for the upstream, the audit log or a reply)."""
    if not _SURROGATE_ESCAPE.search(raw):  # the common case: no escaped surrogate at all
        return None
    stack: list[tuple[Any, tuple[int | str, ...]]] = [(payload, ())]
    while stack:
        obj, path = stack.pop()
        if isinstance(obj, str):
            if not _utf8(obj):
                return _loc(path)
        elif isinstance(obj, dict):
            for key, value in obj.items():
                if not _utf8(key):
                    return _loc(path) + " (a key)"
                stack.append((value, (*path, key)))
        elif isinstance(obj, list):
            stack.extend((value, (*path, i)) for i, value in enumerate(obj))
    return None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# Stable ``safetygame.reason_code`` per failure status, and the generic message clients get
# in ``safetygame.reason``; the full reason (upstream URLs, error texts) goes to the audit
# record and the server log only.
FAILURE_REASONS: dict[Status, tuple[str, str]] = {
    Status.GENERATION_FAILED: (
        "upstream_generation_failed",
        "The model could not produce candidate replies; the policy's refusal was sent.",
    ),
    Status.SCORING_FAILED: (
        "scoring_failed",
        "The candidate replies could not be scored; the policy's refusal was sent.",
    ),
    Status.SOLVER_FAILED: (
        "solver_failed",
        "The game could not be solved; the policy's refusal was sent.",
    ),
    Status.TIMEOUT: (
        "decision_timeout",
        "No decision was reached in time; the policy's refusal was sent.",
    ),
}


def reason_code(decision: Decision) -> str:
    """A stable code for why ``decision`` went the way it did."""
    if decision.status is Status.OK:
        return "answered" if decision.action == "answer" else "refused_by_game"
    return FAILURE_REASONS[decision.status][0]


def client_reason(decision: Decision) -> str:
    """What a client is told: the game's own reason when it decided (it names candidates
    and budgets only), a generic message when it failed."""
    if decision.status is Status.OK:
        return decision.reason
    return FAILURE_REASONS[decision.status][1]


def completion_body(decision: Decision, model: str, request_id: str) -> dict[str, Any]:
    """A standard ``ChatCompletion`` carrying the chosen text, plus ``safetygame``."""
    return {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion",
        "created": int(decision.created),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": decision.chosen_text},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage(decision),
        "safetygame": summary(decision),
    }


def usage(decision: Decision) -> dict[str, int]:
    """Tokens of the reply sent; the game's own traffic is in ``safetygame.tokens``."""
    n = decision.candidates[decision.chosen_index].completion_tokens
    return {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}


def summary(decision: Decision) -> dict[str, Any]:
    """``safetygame`` of a response: the decision summary with a stable ``reason_code`` and
    a ``reason`` fit for clients (``client_reason``)."""
    return {
        **decision.summary(),
        "reason": client_reason(decision),
        "reason_code": reason_code(decision),
        "policy_digest": decision.policy_digest,
        "tokens": dict(decision.tokens),
    }


def _chunk(
    request_id: str,
    created: int,
    model: str,
    delta: dict[str, Any],
    finish: str | None,
    extra: dict[str, Any] | None = None,
) -> str:
    body: dict[str, Any] = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if extra:
        body.update(extra)
    return "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"


def stream_events(
    decision: Decision,
    model: str,
    request_id: str,
    *,
    include_usage: bool = False,
    piece: int = 24,
) -> Iterator[str]:
    """The decided answer as SSE chunks: role, text pieces, a final chunk with
    ``finish_reason`` and ``safetygame``, then ``[DONE]``. The decision is final before the
    first byte is sent: streaming never shows text the game did not choose."""
    created = int(decision.created or time.time())
    yield _chunk(request_id, created, model, {"role": "assistant", "content": ""}, None)
    text = decision.chosen_text
    for i in range(0, len(text), piece):
        yield _chunk(request_id, created, model, {"content": text[i : i + piece]}, None)
    yield _chunk(request_id, created, model, {}, "stop", {"safetygame": summary(decision)})
    if include_usage:
        body = {
            "id": f"chatcmpl-{request_id}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage(decision),
        }
        yield "data: " + json.dumps(body) + "\n\n"
    yield "data: [DONE]\n\n"

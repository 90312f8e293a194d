"""LiteLLM: a proxy guardrail that answers through the Safety Game.

:class:`SafetyGameGuardrail` is a LiteLLM ``CustomGuardrail``. Declared in the proxy's
``config.yaml`` with ``mode: [pre_call, post_call]`` (README, "LiteLLM"; docs/litellm.md):

- **pre_call** asks the upstream for the policy's candidates: it sets ``n`` (the policy's
  ``sampling.n``) and the policy's ``temperature``, ``top_p`` and ``max_tokens`` where the
  request did not set them. It rejects (HTTP 400) what the game cannot take: any call type
  that generates other than a chat completion (text completions, the Responses API,
  Anthropic messages, images, ...: they would bypass the game; embeddings, moderation and
  rerank pass, they generate nothing), streaming (the game needs every candidate whole, and
  LiteLLM runs no post-call hook on a stream), tools (a tool call would reach the client
  unjudged), non-text content parts (the judge would read less than the model) and chats
  whose last message is not the user's or that hold tool messages.
- **post_call** takes the returned choices plus the policy's refusal, scores them with the
  policy's scorers on the **judge** (an OpenAI-compatible server at ``api_base``, e.g. the
  same llama.cpp server), plays the game (:class:`~safetygame.agent.SafetyGame`: no math
  here) and returns the response with one choice rebuilt from the chosen text (or the
  refusal; never an upstream choice as it came, which could carry tool calls), and the
  decision summary in its top-level ``safetygame`` field (``Decision.summary()`` plus
  ``choices_returned`` and ``choices_drawn``), which LiteLLM passes through to the client
  (``completion.model_extra["safetygame"]`` with the ``openai`` client).

Fewer choices than the policy's ``n`` (an upstream that ignores ``n``, or a client that asked
for fewer): the guardrail fills up with concurrent ``n=1`` requests to the same model through
the proxy's router, with the request's sampling constraints (:func:`router_filler`);
outside a proxy, or when the router fails, the game plays with the choices it has, which
stays safe (the refusal is always a candidate) but mixes over fewer answers.

It fails closed: no choice, a judge that cannot be reached, a scoring or solver failure, a
generated response that is not a chat completion, or any unexpected error ends in the
policy's refusal, with the status and reason in the summary.

Install: ``pip install 'safetygame[litellm]'``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

try:
    import litellm
    from fastapi import HTTPException
    from litellm.integrations.custom_guardrail import CustomGuardrail
    from litellm.types.llms.openai import OpenAIModerationResponse
    from litellm.types.utils import ModerationCreateResponse
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "safetygame.integrations.litellm needs litellm: pip install 'safetygame[litellm]'"
    ) from exc

from safetygame.agent import SafetyGame
from safetygame.backends.base import (
    Backend,
    Completion,
    LogLik,
    Message,
    SamplingConfig,
    YesNo,
    apportion,
)
from safetygame.backends.openai_compat import OpenAICompatBackend
from safetygame.errors import BackendError, BackendUnsupported, ConfigError
from safetygame.policy import Policy, load_policy
from safetygame.scorers import build_scorer

__all__ = ["SafetyGameGuardrail"]

log = logging.getLogger("safetygame.integrations.litellm")

Filler = Callable[[int], Awaitable[list[Completion]]]

# The response field the decision summary travels in (the gateway's name for it too).
FIELD = "safetygame"

# The call types the game decides: chat completions.
CHAT_CALLS = frozenset({"completion", "acompletion"})
# Call types that generate no text or media, let through untouched. Every other call type
# is refused in pre-call: it generates (text completions, responses, anthropic messages,
# images, speech...) and would bypass the game.
NON_GENERATING_CALLS = frozenset(
    {"embedding", "aembedding", "moderation", "amoderation", "rerank", "arerank"}
)
# Responses of those calls, passed through by post-call; any other non-chat response is
# replaced by the refusal.
NON_GENERATED_RESPONSES: tuple[type, ...] = (
    litellm.EmbeddingResponse,
    litellm.RerankResponse,
    ModerationCreateResponse,
    OpenAIModerationResponse,
)
# Request fields that ask for tool calls: a tool call is not text the game can judge.
TOOL_FIELDS = ("tools", "functions", "tool_choice", "function_call")
# The sampling constraints a fill-up request keeps from the client's request (not n: each
# fill-up asks for one; seed: offset per fill-up, so the draws differ).
FILL_KEEPS = (
    "model",
    "messages",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "max_tokens",
    "max_completion_tokens",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "response_format",
    "reasoning_effort",
)


class ReturnedChoices(Backend):
    """The sampler of one request: the choices the upstream already returned, then, when
    the game asks for more, whatever ``fill(k)`` draws (none: the game plays with these).

    It samples only; the scorers ask the judge."""

    model_id = "litellm-upstream"

    def __init__(self, returned: Sequence[Completion], fill: Filler | None) -> None:
        self.pending = list(returned)
        self.fill = fill
        self.taken: list[Completion] = []  # candidates the game took, returned then filled

    async def sample(
        self, messages: Sequence[Message], n: int, config: SamplingConfig
    ) -> list[Completion]:
        take, self.pending = self.pending[:n], self.pending[n:]
        if len(take) < n and self.fill is not None:
            take += await self.fill(n - len(take))
        if not take:
            raise BackendError("the upstream returned no choice to play the game with")
        self.taken += take
        return take

    async def yes_no(self, messages: Sequence[Message]) -> YesNo:
        raise BackendUnsupported("the returned choices only sample; scorers ask the judge")

    async def loglik(self, messages: Sequence[Message], continuation: str) -> LogLik:
        raise BackendUnsupported("the returned choices only sample; scorers ask the judge")


def chat_of(messages: Any) -> tuple[Message, ...]:
    """The request's chat as safetygame Messages; ConfigError on what the game cannot take."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError("messages must be a non-empty list")
    roles = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
    out: list[Message] = []
    for i, m in enumerate(messages):
        role = roles.get(str(m.get("role"))) if isinstance(m, Mapping) else None
        if role is None:
            got = m.get("role") if isinstance(m, Mapping) else type(m).__name__
            raise ConfigError(
                f"messages[{i}]: the Safety Game takes system, user and assistant messages, "
                f"not {got!r}"
            )
        out.append(Message(role, _text(m.get("content"), i)))  # type: ignore[arg-type]
    if out[-1].role != "user":
        raise ConfigError("messages: the last message must come from the user")
    return tuple(out)


def _text(content: Any, i: int) -> str:
    """A message's text: a string, or OpenAI content parts that are all text (an image or
    audio part would reach the model but not the judge: refused, as the gateway does)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ConfigError(f"messages[{i}].content must be a string or a list of text parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
        if kind != "text" or not isinstance(part.get("text"), str):
            raise ConfigError(
                f"messages[{i}].content[{j}]: the Safety Game reads text parts only, not "
                f"{kind!r}: send the text alone"
            )
        texts.append(part["text"])
    return "".join(texts)


def completions_of(response: Any) -> list[Completion]:
    """The text choices of a LiteLLM ``ModelResponse`` (a tool call counts as empty), the
    response's completion tokens shared out by length (as the OpenAI backend does)."""
    choices = list(getattr(response, "choices", None) or [])
    texts = []
    for choice in choices:
        content = getattr(getattr(choice, "message", None), "content", None)
        texts.append(content if isinstance(content, str) else "")
    usage = getattr(response, "usage", None)
    total = int(getattr(usage, "completion_tokens", 0) or 0) if usage is not None else 0
    tokens = apportion(total, [len(t) for t in texts])
    return [
        Completion(
            text=text,
            finish_reason=str(getattr(choice, "finish_reason", None) or "stop"),
            completion_tokens=k,
        )
        for text, choice, k in zip(texts, choices, tokens, strict=True)
    ]


class SafetyGameGuardrail(CustomGuardrail):
    """A LiteLLM guardrail that returns the Safety Game's choice among the ``n`` choices.

    Parameters (``litellm_params`` in config.yaml):

    - ``api_base``: the judge, an OpenAI-compatible server the scorers ask (required);
      ``api_key``: its key; ``judge_model``: the ``model`` sent to it.
    - ``policy``: a shipped policy name or a policy file (default: the shipped default).
    - ``budget``: lowers the policy's harm budget.
    - ``decision_timeout``: seconds per decision, then the refusal (default 600).
    - ``fill``: draw missing candidates through the proxy's router (default true).
    """

    def __init__(
        self,
        api_base: str | None = None,
        api_key: str | None = None,
        judge_model: str | None = None,
        policy: str | Policy | None = None,
        budget: float | None = None,
        decision_timeout: float = 600.0,
        fill: bool = True,
        **kwargs: Any,
    ) -> None:
        if not api_base:
            raise ConfigError(
                "SafetyGameGuardrail needs litellm_params.api_base: the judge's "
                "OpenAI-compatible URL (e.g. the llama.cpp server behind the proxy)"
            )
        hook = kwargs.get("event_hook")
        hooks = {hook} if isinstance(hook, str) else set(hook) if isinstance(hook, list) else None
        if hook is not None and not (hooks and {"pre_call", "post_call"} <= hooks):
            # post_call alone would let streams through unguarded (no post-call hook runs)
            raise ConfigError(
                f"SafetyGameGuardrail needs mode: [pre_call, post_call], got {hook!r}"
            )
        self.policy = pol = policy if isinstance(policy, Policy) else load_policy(policy)
        self.budget = budget
        self.decision_timeout = float(decision_timeout)
        self.fill = bool(fill)
        self.judge = OpenAICompatBackend(api_base, judge_model, api_key, model_id=judge_model)
        # Scorers named by the policy, built (and checked) once at proxy start-up.
        self.helpfulness = build_scorer(
            pol.scorers.helpfulness, self.judge, pol, kind="helpfulness"
        )
        self.harm = build_scorer(pol.scorers.harm, self.judge, pol, kind="harm")
        self._agent(ReturnedChoices([], None))._budgets(budget)  # a bad budget stops start-up
        super().__init__(**kwargs)

    def _agent(self, sampler: ReturnedChoices) -> SafetyGame:
        return SafetyGame(
            sampler,
            self.policy,
            helpfulness=self.helpfulness,
            harm=self.harm,
            timeout=self.decision_timeout,
        )

    # -- pre_call: ask for the candidates ----------------------------------------------
    async def async_pre_call_hook(
        self, user_api_key_dict: Any, cache: Any, data: dict, call_type: Any
    ) -> dict | None:
        kind = str(getattr(call_type, "value", call_type))
        if kind in NON_GENERATING_CALLS:
            return data
        if kind not in CHAT_CALLS:
            raise HTTPException(
                status_code=400,
                detail=f"the safetygame guardrail decides chat completions only, not "
                f"{kind!r} (it would reach the client unjudged): send it to "
                "/v1/chat/completions",
            )
        if data.get("stream"):
            raise HTTPException(
                status_code=400,
                detail="the safetygame guardrail needs every candidate whole: "
                "send this request without stream",
            )
        tools = [k for k in TOOL_FIELDS if data.get(k) not in (None, [], {})]
        if tools:
            raise HTTPException(
                status_code=400,
                detail=f"the safetygame guardrail judges text answers only, and a tool call "
                f"would reach the client unjudged: send this request without {tools[0]!r}",
            )
        try:
            chat_of(data.get("messages"))
        except ConfigError as exc:
            raise HTTPException(status_code=400, detail=f"safetygame guardrail: {exc}") from None
        s = self.policy.sampling
        wanted = {"n": s.n, "temperature": s.temperature, "top_p": s.top_p}
        wanted["max_tokens"] = s.max_tokens
        for key, value in wanted.items():
            if data.get(key) is None and not (
                key == "max_tokens" and data.get("max_completion_tokens")
            ):
                data[key] = value
        return data

    # -- post_call: play the game ------------------------------------------------------
    async def async_post_call_success_hook(
        self, data: dict, user_api_key_dict: Any, response: Any
    ) -> Any:
        if isinstance(response, NON_GENERATED_RESPONSES):
            return response  # embeddings, moderation, rerank: nothing generated to decide
        if not isinstance(response, litellm.ModelResponse):
            # generated, but not a chat the game can decide (pre-call refuses these calls;
            # one that got here anyway gets the refusal)
            return self._refused(type(response).__name__)
        returned = completions_of(response)
        sampler = ReturnedChoices(returned, router_filler(data) if self.fill else None)
        summary: dict[str, Any]
        chosen: Completion | None = None
        try:
            chat = chat_of(data.get("messages"))
            decision = await self._agent(sampler).arespond(chat, budget=self.budget)
            if not decision.refused:
                chosen = sampler.taken[decision.chosen_index - 1]
            summary = decision.summary()
        except Exception as exc:  # fail closed on anything the agent did not turn into a status
            log.warning("safetygame guardrail failed closed: %s: %s", type(exc).__name__, exc)
            chosen, summary = None, self._error_summary(f"{type(exc).__name__}: {exc}")
        summary["choices_returned"] = len(returned)
        summary["choices_drawn"] = len(sampler.taken)
        if chosen is None:
            return _answer(response, self.policy.refusal, "stop", summary)
        # a length cut stays visible; anything else (e.g. "tool_calls") is now plain text
        finish = chosen.finish_reason if chosen.finish_reason == "length" else "stop"
        return _answer(response, chosen.text, finish, summary)

    def _error_summary(self, reason: str) -> dict[str, Any]:
        return {
            "status": "error",
            "action": "refuse",
            "reason": reason,
            "policy_id": self.policy.id,
            "policy_version": self.policy.version,
        }

    def _refused(self, kind: str) -> Any:
        """The refusal as a chat completion, for a generated response the game cannot
        decide (``kind``: its type)."""
        log.warning("safetygame guardrail refused a %s response: not a chat completion", kind)
        summary = self._error_summary(
            f"unsupported response {kind}: the Safety Game decides chat completions only"
        )
        summary["choices_returned"] = summary["choices_drawn"] = 0
        return _answer(litellm.ModelResponse(), self.policy.refusal, "stop", summary)


def _answer(response: Any, text: str, finish_reason: str, summary: dict[str, Any]) -> Any:
    """``response`` with one choice built from ``text`` (never an upstream choice as it
    came: its message could carry tool calls or other fields the game did not judge) and
    the summary."""
    response.choices = [
        litellm.Choices(
            index=0,
            finish_reason=finish_reason,
            message=litellm.Message(role="assistant", content=text),
        )
    ]
    setattr(response, FIELD, summary)
    return response


def router_filler(data: Mapping[str, Any]) -> Filler:
    """``fill(k)``: k more candidates of the request's model through the proxy's router,
    or none outside a proxy.

    Each is an ``n=1`` request (concurrent) with the client's sampling constraints
    (``FILL_KEEPS``: temperature, top_p, max_tokens, stop, penalties, response_format, ...),
    and, when the client sent a seed, its own seed (seed+1, seed+2, ...: the draws must
    differ). It calls the router directly (``llm_router.acompletion``): the same model
    group, its deployments and provider keys, the router's retries, fallbacks and
    deployment limits; not the proxy's request path, so the proxy's per-key hooks (key
    and team limits and budgets, other guardrails) do not run on it and its spend is not
    tracked against the client's key."""
    request = {k: data[k] for k in FILL_KEEPS if data.get(k) is not None}
    seed = data.get("seed")
    offset = 0  # seeds used so far (an adaptive decision fills up twice)

    def seeded() -> dict[str, Any]:
        nonlocal offset
        if not isinstance(seed, int) or isinstance(seed, bool):
            return {}
        offset += 1
        return {"seed": seed + offset}

    async def fill(k: int) -> list[Completion]:
        try:
            from litellm.proxy.proxy_server import llm_router
        except ImportError:
            return []
        if llm_router is None:
            return []
        try:
            replies = await asyncio.gather(
                *(llm_router.acompletion(**request, **seeded(), n=1) for _ in range(k))
            )
        except Exception as exc:  # the game plays with what it has
            log.warning("safetygame guardrail could not fill up: %s: %s", type(exc).__name__, exc)
            return []
        return [c for r in replies for c in completions_of(r)]

    return fill

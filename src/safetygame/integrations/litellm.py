"""LiteLLM: a proxy guardrail that answers through the Safety Game.

:class:`SafetyGameGuardrail` is a LiteLLM ``CustomGuardrail``. Declared in the proxy's
``config.yaml`` with ``mode: [pre_call, post_call]`` (README, "LiteLLM"; docs/litellm.md):

- **pre_call** asks the upstream for the policy's candidates: it sets ``n`` (the policy's
  ``sampling.n``) and the policy's ``temperature``, ``top_p`` and ``max_tokens`` where the
  request did not set them. It rejects (HTTP 400) what the game cannot take: streaming (the
  game needs every candidate whole, and LiteLLM runs no post-call hook on a stream) and
  chats whose last message is not the user's or that hold tool messages.
- **post_call** takes the returned choices plus the policy's refusal, scores them with the
  policy's scorers on the **judge** (an OpenAI-compatible server at ``api_base``, e.g. the
  same llama.cpp server), plays the game (:class:`~safetygame.agent.SafetyGame`: no math
  here) and returns the response with one choice, the chosen answer or the refusal, and the
  decision summary in its top-level ``safetygame`` field (``Decision.summary()`` plus
  ``choices_returned`` and ``choices_drawn``), which LiteLLM passes through to the client
  (``completion.model_extra["safetygame"]`` with the ``openai`` client).

Fewer choices than the policy's ``n`` (an upstream that ignores ``n``, or a client that asked
for fewer): the guardrail fills up with concurrent ``n=1`` requests to the same model through
the proxy's own router (same deployment, keys and limits); outside a proxy, or when the
router fails, the game plays with the choices it has, which stays safe (the refusal is
always a candidate) but mixes over fewer answers.

It fails closed: no choice, a judge that cannot be reached, a scoring or solver failure or
any unexpected error ends in the policy's refusal, with the status and reason in the summary.

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


class ReturnedChoices(Backend):
    """The sampler of one request: the choices the upstream already returned, then, when
    the game asks for more, whatever ``fill(k)`` draws (none: the game plays with these).

    It samples only; the scorers ask the judge."""

    model_id = "litellm-upstream"

    def __init__(self, returned: Sequence[Completion], fill: Filler | None) -> None:
        self.pending = list(returned)
        self.fill = fill
        self.drawn = 0  # candidates the game took, returned and filled

    async def sample(
        self, messages: Sequence[Message], n: int, config: SamplingConfig
    ) -> list[Completion]:
        take, self.pending = self.pending[:n], self.pending[n:]
        if len(take) < n and self.fill is not None:
            take += await self.fill(n - len(take))
        if not take:
            raise BackendError("the upstream returned no choice to play the game with")
        self.drawn += len(take)
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
        out.append(Message(role, _text(m.get("content"))))  # type: ignore[arg-type]
    if out[-1].role != "user":
        raise ConfigError("messages: the last message must come from the user")
    return tuple(out)


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts: the text ones
        return "".join(
            str(p.get("text", ""))
            for p in content
            if isinstance(p, Mapping) and p.get("type") == "text"
        )
    return ""


def completions_of(response: Any) -> list[Completion]:
    """The text choices of a LiteLLM ``ModelResponse`` (a tool call counts as empty)."""
    out = []
    usage = getattr(response, "usage", None)
    per_choice = 0
    choices = list(getattr(response, "choices", None) or [])
    if usage is not None and choices:
        per_choice = int(getattr(usage, "completion_tokens", 0) or 0) // len(choices)
    for choice in choices:
        message = getattr(choice, "message", None)
        content = getattr(message, "content", None)
        out.append(
            Completion(
                text=content if isinstance(content, str) else "",
                finish_reason=str(getattr(choice, "finish_reason", None) or "stop"),
                completion_tokens=per_choice,
            )
        )
    return out


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
        if call_type not in ("completion", "acompletion"):
            return data
        if data.get("stream"):
            raise HTTPException(
                status_code=400,
                detail="the safetygame guardrail needs every candidate whole: "
                "send this request without stream",
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
        if not isinstance(response, litellm.ModelResponse):
            return response  # embeddings, images...: not a chat the game can decide
        returned = completions_of(response)
        sampler = ReturnedChoices(returned, router_filler(data) if self.fill else None)
        summary: dict[str, Any]
        chosen: int | None = None  # index into the candidates drawn (returned, then filled)
        text = self.policy.refusal
        try:
            chat = chat_of(data.get("messages"))
            decision = await self._agent(sampler).arespond(chat, budget=self.budget)
            if not decision.refused:
                chosen, text = decision.chosen_index - 1, decision.chosen_text
            summary = decision.summary()
        except Exception as exc:  # fail closed on anything the agent did not turn into a status
            log.warning("safetygame guardrail failed closed: %s: %s", type(exc).__name__, exc)
            chosen, text = None, self.policy.refusal
            summary = {
                "status": "error",
                "action": "refuse",
                "reason": f"{type(exc).__name__}: {exc}",
                "policy_id": self.policy.id,
                "policy_version": self.policy.version,
            }
        summary["choices_returned"] = len(returned)
        summary["choices_drawn"] = sampler.drawn
        return _answer(response, chosen, text, summary)


def _answer(response: Any, chosen: int | None, text: str, summary: dict[str, Any]) -> Any:
    """``response`` with one choice and the summary: the returned choice ``chosen`` as it
    came, else (a filled-up candidate, the refusal) a plain one with ``text``."""
    if chosen is not None and chosen < len(response.choices):
        choice = response.choices[chosen]
    else:
        choice = litellm.Choices(
            index=0,
            finish_reason="stop",
            message=litellm.Message(role="assistant", content=text),
        )
    choice.index = 0
    response.choices = [choice]
    setattr(response, FIELD, summary)
    return response


def router_filler(data: Mapping[str, Any]) -> Filler:
    """``fill(k)``: k more candidates of the request's model through the proxy's router
    (concurrent ``n=1`` calls, no seed: each must differ), or none outside a proxy."""
    request = {
        k: data[k]
        for k in (
            "model",
            "messages",
            "temperature",
            "top_p",
            "max_tokens",
            "max_completion_tokens",
        )
        if data.get(k) is not None
    }

    async def fill(k: int) -> list[Completion]:
        try:
            from litellm.proxy.proxy_server import llm_router
        except ImportError:
            return []
        if llm_router is None:
            return []
        try:
            replies = await asyncio.gather(
                *(llm_router.acompletion(**request, n=1) for _ in range(k))
            )
        except Exception as exc:  # the game plays with what it has
            log.warning("safetygame guardrail could not fill up: %s: %s", type(exc).__name__, exc)
            return []
        return [c for r in replies for c in completions_of(r)]

    return fill

"""LangChain: a chat model that runs the Safety Game around any inner LangChain chat model.

:class:`SafetyGameChat` is a langchain-core ``BaseChatModel``, so it goes wherever a chat
model goes (``invoke``, ``ainvoke``, ``batch``, LCEL chains). Each call:

1. samples the policy's ``n`` candidate replies from the **inner** chat model (its own
   settings apply: temperature, max tokens, ...; give it a temperature above 0);
2. scores them with the policy's scorers on the **judge**: a safetygame
   :class:`~safetygame.backends.base.Backend` (e.g. an
   :class:`~safetygame.backends.openai_compat.OpenAICompatBackend` on the same server, which
   reads yes/no answers from log-probabilities), or by default the inner model itself, read
   from its log-probabilities when it returns them (``ChatOpenAI(logprobs=True,
   top_logprobs=20)``) and otherwise from ``yes_no_samples`` sampled replies;
3. plays the game and returns the chosen reply (possibly the policy's refusal) as an
   ``AIMessage`` whose ``response_metadata["safetygame"]`` is the decision summary
   (``Decision.summary()``: status, action, reason, strategy, expected risk, budget, policy).

It fails closed: a backend failure, a scoring failure or any unexpected error ends in the
policy's refusal, with the status and reason in the metadata; only a request the game cannot
take (no user message last, a message type it does not know) raises ``ConfigError``.
``stop`` sequences are not supported (a warning says so) since they would cut candidates
before they are scored.

Synchronous calls (``invoke``) run each decision on a fresh event loop and call the inner
model through its sync API (in threads), since LangChain's async clients stay bound to the
loop they were first used on; asynchronous calls (``ainvoke``) use its async API.

Install: ``pip install 'safetygame[langchain]'`` (langchain-core).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import warnings
from collections.abc import Sequence
from typing import Any

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForLLMRun,
        CallbackManagerForLLMRun,
    )
    from langchain_core.language_models.chat_models import BaseChatModel
    from langchain_core.messages import (
        AIMessage,
        BaseMessage,
        HumanMessage,
        SystemMessage,
    )
    from langchain_core.outputs import ChatGeneration, ChatResult
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "safetygame.integrations.langchain needs langchain-core: "
        "pip install 'safetygame[langchain]'"
    ) from exc
from pydantic import ConfigDict, Field, PrivateAttr

from safetygame.agent import SafetyGame
from safetygame.backends.base import (
    Backend,
    Completion,
    LogLik,
    Message,
    SamplingConfig,
    YesNo,
    yes_no_from_top_logprobs,
)
from safetygame.errors import BackendError, BackendProtocolError, BackendUnsupported, ConfigError
from safetygame.policy import Policy, load_policy
from safetygame.scorers import build_scorer

__all__ = ["LangChainBackend", "SafetyGameChat"]

# Set while a synchronous caller (``invoke``) runs the game on a fresh event loop: the inner
# model is then called through its sync API in a thread, because its async client (httpx)
# is bound to the loop of its first use and fails on the next ("Event loop is closed").
_SYNC_CALLER: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "safetygame_langchain_sync_caller", default=False
)


def to_langchain(messages: Sequence[Message]) -> list[BaseMessage]:
    kinds = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
    return [kinds[m.role](content=m.content) for m in messages]


def from_langchain(messages: Sequence[BaseMessage]) -> tuple[Message, ...]:
    roles = {"system": "system", "human": "user", "ai": "assistant"}
    out: list[Message] = []
    for i, m in enumerate(messages):
        role = roles.get(m.type)
        if role is None:
            raise ConfigError(
                f"messages[{i}]: SafetyGameChat takes system, human and ai messages, not {m.type!r}"
            )
        out.append(Message(role, _text(m)))  # type: ignore[arg-type]
    if not out:
        raise ConfigError("messages must not be empty")
    return tuple(out)


def _text(message: BaseMessage) -> str:
    content = message.content
    if isinstance(content, str):
        return content
    parts = [
        p if isinstance(p, str) else str(p.get("text", ""))
        for p in content
        if isinstance(p, str) or (isinstance(p, dict) and p.get("type") == "text")
    ]
    return "".join(parts)


class LangChainBackend(Backend):
    """A safetygame Backend over a LangChain chat model (sampling and yes/no; no loglik).

    ``sample`` runs ``n`` concurrent calls of the model as configured (``SamplingConfig`` is
    not applied: LangChain has no portable way to set temperature per call). ``yes_no`` reads
    P(yes) from the first token's top log-probabilities when the model returns them in
    ``response_metadata["logprobs"]`` (OpenAI's shape), else counts Yes/No over
    ``yes_no_samples`` replies. Model errors become ``BackendError`` (``from`` the original).
    """

    def __init__(self, model: BaseChatModel, *, yes_no_samples: int = 8) -> None:
        if yes_no_samples < 1:
            raise ConfigError("yes_no_samples must be >= 1")
        self.model = model
        self.yes_no_samples = yes_no_samples
        name = getattr(model, "model_name", None) or getattr(model, "model", None)
        self.model_id = f"langchain:{model._llm_type}" + (f":{name}" if name else "")

    async def _replies(self, messages: Sequence[Message], n: int) -> list[BaseMessage]:
        chat = to_langchain(messages)
        try:
            if _SYNC_CALLER.get():
                return list(await asyncio.to_thread(self.model.batch, [chat] * n))
            return list(await self.model.abatch([chat] * n))
        except Exception as exc:  # any provider SDK error: the game fails closed on it
            raise BackendError(f"inner chat model failed: {type(exc).__name__}: {exc}") from exc

    async def sample(
        self, messages: Sequence[Message], n: int, config: SamplingConfig
    ) -> list[Completion]:
        if n < 1:
            raise ConfigError("n must be >= 1")
        replies = await self._replies(messages, n)
        out = []
        for r in replies:
            usage = getattr(r, "usage_metadata", None) or {}
            out.append(
                Completion(
                    text=_text(r),
                    finish_reason=str(r.response_metadata.get("finish_reason") or "stop"),
                    prompt_tokens=int(usage.get("input_tokens", 0) or 0),
                    completion_tokens=int(usage.get("output_tokens", 0) or 0),
                )
            )
        return out

    async def yes_no(self, messages: Sequence[Message]) -> YesNo:
        (first,) = await self._replies(messages, 1)
        top = _first_token_top(first)
        if top is not None:
            reading = yes_no_from_top_logprobs(top)
            if reading is not None:
                return YesNo(reading[0], "logprobs", reading[1], calls=1)
        more = (
            await self._replies(messages, self.yes_no_samples - 1)
            if self.yes_no_samples > 1
            else []
        )
        yes = no = 0
        for r in [first, *more]:
            words = _text(r).strip().split()
            word = words[0].strip(".,!:;\"'*").lower() if words else ""
            yes += word == "yes"
            no += word == "no"
        if yes + no == 0:
            raise BackendProtocolError(
                f"the inner model answered neither Yes nor No in {1 + len(more)} replies"
            )
        k = 1 + len(more)
        return YesNo(yes / (yes + no), "sampled", (yes + no) / k, calls=k)

    async def loglik(self, messages: Sequence[Message], continuation: str) -> LogLik:
        raise BackendUnsupported(
            f"{self.model_id} gives no log-likelihoods; multiple-choice methods need a "
            "safetygame backend (llama.cpp or vLLM)"
        )


def _first_token_top(reply: BaseMessage) -> dict[str, float] | None:
    """token -> logprob at the first generated position, from OpenAI-shaped logprobs."""
    logprobs = reply.response_metadata.get("logprobs")
    content = logprobs.get("content") if isinstance(logprobs, dict) else None
    if not isinstance(content, list) or not content or not isinstance(content[0], dict):
        return None
    first = content[0]
    table: dict[str, float] = {}
    for e in [*(first.get("top_logprobs") or []), first]:
        if isinstance(e, dict) and isinstance(e.get("token"), str):
            lp = e.get("logprob")
            if isinstance(lp, int | float):
                table.setdefault(e["token"], float(lp))
    return table or None


class SafetyGameChat(BaseChatModel):
    """A LangChain chat model that answers through the Safety Game around ``inner``.

    ``judge``: the safetygame Backend the scorers ask (default: ``inner`` itself, through
    :class:`LangChainBackend`). ``policy``: default the shipped default policy. ``budget``
    may lower the policy's harm budget. ``timeout``: seconds per decision (then the refusal).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    inner: BaseChatModel
    judge: Backend | None = None
    policy: Policy | None = None
    budget: float | None = None
    timeout: float | None = Field(default=600.0, gt=0)
    yes_no_samples: int = Field(default=8, ge=1)

    _agent: SafetyGame | None = PrivateAttr(default=None)

    @property
    def _llm_type(self) -> str:
        return "safetygame"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        policy_id = self.policy.id if self.policy is not None else "default"
        return {"inner": self.inner._llm_type, "policy_id": policy_id, "budget": self.budget}

    def _get_agent(self) -> SafetyGame:
        if self._agent is None:
            policy = self.policy if self.policy is not None else load_policy()
            sampler = LangChainBackend(self.inner, yes_no_samples=self.yes_no_samples)
            judge = self.judge if self.judge is not None else sampler
            self._agent = SafetyGame(
                sampler,
                policy,
                helpfulness=build_scorer(
                    policy.scorers.helpfulness, judge, policy, kind="helpfulness"
                ),
                harm=build_scorer(policy.scorers.harm, judge, policy, kind="harm"),
                timeout=self.timeout,
            )
        return self._agent

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if stop:
            warnings.warn(
                "SafetyGameChat ignores stop sequences (candidates are scored whole)",
                stacklevel=2,
            )
        chat = from_langchain(messages)
        if chat[-1].role != "user":
            raise ConfigError("messages: the last message must come from the user")
        agent = self._get_agent()
        try:
            decision = await agent.arespond(chat, budget=self.budget)
        except ConfigError:
            raise
        except Exception as exc:  # fail closed on anything the agent did not turn into a status
            summary = {
                "status": "error",
                "action": "refuse",
                "reason": f"{type(exc).__name__}: {exc}",
                "policy_id": agent.policy.id,
                "policy_version": agent.policy.version,
            }
            message = AIMessage(
                content=agent.policy.refusal, response_metadata={"safetygame": summary}
            )
            return ChatResult(generations=[ChatGeneration(message=message)])
        summary = decision.summary()
        message = AIMessage(
            content=decision.chosen_text,
            response_metadata={"safetygame": summary, "model_name": agent.backend.model_id},
        )
        info = {"status": decision.status.value, "action": decision.action}
        return ChatResult(generations=[ChatGeneration(message=message, generation_info=info)])

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        token = _SYNC_CALLER.set(True)
        try:
            coro = self._agenerate(messages, stop=stop, **kwargs)
            try:
                asyncio.get_running_loop()
            except RuntimeError:
                return asyncio.run(coro)
            # called from inside a running event loop (e.g. a notebook): run on a fresh one
            ctx = contextvars.copy_context()
            with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
                return pool.submit(ctx.run, asyncio.run, coro).result()
        finally:
            _SYNC_CALLER.reset(token)

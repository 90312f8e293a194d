"""The gateway: an OpenAI-compatible chat endpoint that answers through the Safety Game.

``create_app(backend, settings)`` builds a Starlette app; all state lives in the objects it
creates (no module-level state), so tests can run several apps side by side. Routes:

- ``POST /v1/chat/completions``: OpenAI schema, streaming or not, plus ``safetygame``;
- ``POST /v1/moderations``: OpenAI schema, verdicts from the policy's harm scorer
  (``gateway/moderation.py``), plus ``safetygame``;
- ``GET /v1/models``, ``GET /healthz``, ``GET /metrics`` (Prometheus text);
- ``GET /v1/safetygame/decisions?limit=&since=``: the caller's own audit records;
- ``GET /``: the dashboard.

Status-code policy (docs/gateway.md): a decision, including a fail-safe refusal after an
upstream failure, is 200 with ``safetygame.status`` and the ``X-Safetygame-Status`` header;
client mistakes are 400/401/404/413 with the OpenAI error envelope; a decision that could
not be written to the audit log is never sent (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from safetygame.agent import Decision, SafetyGame, Status
from safetygame.backends.base import Backend
from safetygame.errors import ConfigError
from safetygame.gateway.audit import (
    AuditStore,
    audit_record,
    moderation_record,
    open_store,
)
from safetygame.gateway.auth import bearer_token
from safetygame.gateway.metrics import CONTENT_TYPE, GatewayMetrics
from safetygame.gateway.moderation import moderate
from safetygame.gateway.runtime import CURRENT_CLOCK, MeteredBackend, Tenants, UpstreamClock
from safetygame.gateway.schemas import (
    ChatRequest,
    ModerationRequest,
    completion_body,
    error_body,
    lone_surrogate_location,
    moderation_body,
    reason_code,
    stream_events,
    validation_error_body,
)
from safetygame.gateway.settings import GatewaySettings
from safetygame.policy import Policy

log = logging.getLogger("safetygame.gateway")
RequestT = TypeVar("RequestT", bound=BaseModel)


class BodyTooLarge(Exception):
    pass


def _from_upstream(exc: BaseException) -> bool:
    """Whether ``exc`` was raised for an upstream's HTTP answer (e.g. a 400 for a prompt
    longer than the model's context), as opposed to the gateway's own checks."""
    cause = exc.__cause__
    while cause is not None:
        if isinstance(cause, httpx.HTTPError):
            return True
        cause = cause.__cause__
    return False


def _error(
    status: int,
    message: str,
    type_: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(message, type_, param=param, code=code), status_code=status, headers=headers
    )


def _too_deep() -> JSONResponse:
    """A body nested beyond what the parsers recurse into: a fixable 400, never a 500."""
    return _error(400, "Request body is nested too deeply.", "invalid_request_error",
                  code="invalid_json")  # fmt: skip


def default_agent_factory(timeout: float) -> Callable[[Backend, Policy], SafetyGame]:
    # Each call gets the time left before its request's deadline; ``timeout`` is the cap.
    def make(backend: Backend, policy: Policy) -> SafetyGame:
        return SafetyGame(backend, policy, timeout=timeout)

    return make


class Gateway:
    """The request handlers and the state they share; one per app."""

    def __init__(
        self,
        backend: Backend,
        settings: GatewaySettings,
        *,
        audit: AuditStore | None = None,
        agent_factory: Callable[[Backend, Policy], SafetyGame] | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = GatewayMetrics()
        self.backend = MeteredBackend(backend, self.metrics)
        self.audit = audit if audit is not None else open_store(settings.audit_url)
        self.tenants = Tenants(
            backend=self.backend,
            metrics=self.metrics,
            make_agent=agent_factory or default_agent_factory(settings.decision_timeout),
            default_policy=settings.policy,
            tenants_file=settings.tenants_file,
        )
        self._watcher: asyncio.Task[None] | None = None
        self.started = time.time()

    # -- lifecycle ------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.audit.start()
        self._watcher = asyncio.create_task(self._watch(), name="policy-watcher")
        try:
            yield
        finally:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            await self.audit.close()

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.settings.reload_interval)
            try:
                # off the event loop: reading files, YAML and building agents (which may load
                # a scorer's model) block for as long as they take
                await asyncio.to_thread(self.tenants.check)
            except Exception:  # the watcher must outlive any surprise; log it and go on
                log.exception("policy watcher: unexpected error")

    # -- helpers --------------------------------------------------------------------------
    def _tenant(self, request: Request) -> str | None:
        return self.tenants.keyring.tenant_for(bearer_token(request.headers.get("authorization")))

    def _unauthorized(self) -> JSONResponse:
        return _error(
            401,
            "Invalid or missing API key. Send it as 'Authorization: Bearer <key>'.",
            "invalid_request_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise BodyTooLarge
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BodyTooLarge
            chunks.append(chunk)
        return b"".join(chunks)

    # -- routes ---------------------------------------------------------------------------
    async def chat(self, request: Request) -> Response:
        return await self._serve(request, self._chat)

    async def moderations(self, request: Request) -> Response:
        return await self._serve(request, self._moderate)

    async def _serve(
        self, request: Request, handler: Callable[[Request, str, str, float], Awaitable[Response]]
    ) -> Response:
        """Authenticate, count, and turn any surprise into a logged 500 (never its text)."""
        t0 = time.perf_counter()
        request_id = uuid.uuid4().hex
        tenant = self._tenant(request)
        if tenant is None:
            self.metrics.requests.inc(tenant="-", code="401")
            return self._unauthorized()
        self.metrics.in_flight.inc()  # until the answer is decided *and* recorded
        late = False  # a late stream counts itself when it ends (_StreamEnd)
        try:
            response = await handler(request, tenant, request_id, t0)
            late = isinstance(response, _LateStream)
        except Exception as exc:
            # Counted like any answer; logged without its message (it may quote a prompt).
            where = traceback.extract_tb(exc.__traceback__)[-1]
            log.error(
                "request %s: unhandled %s at %s:%s; 500 sent",
                request_id,
                type(exc).__name__,
                Path(where.filename).name,
                where.lineno,
            )
            response = _error(500, "Internal error.", "server_error", code="internal_error")
        finally:
            if not late:
                self.metrics.in_flight.dec()
        response.headers["x-request-id"] = request_id
        if not late:
            self.metrics.requests.inc(tenant=tenant, code=str(response.status_code))
        return response

    async def _request(
        self, request: Request, deadline: float, schema: type[RequestT]
    ) -> RequestT | Response:
        """The request body validated against ``schema``, or the 4xx Response to send."""
        payload = await self._payload(request, deadline)
        if isinstance(payload, Response):
            return payload
        try:
            return schema.model_validate(payload)
        except ValidationError as exc:
            return JSONResponse(validation_error_body(exc), status_code=400)
        except RecursionError:
            return _too_deep()

    async def _payload(self, request: Request, deadline: float) -> Any:
        """The request's JSON value, or the error Response to send instead."""
        reserve = self.settings.audit_reserve
        try:
            async with asyncio.timeout(max(deadline - reserve - time.perf_counter(), 0.0)):
                raw = await self._read_body(request)
        except BodyTooLarge:
            return _error(
                413,
                f"Request body exceeds {self.settings.max_body_bytes} bytes.",
                "invalid_request_error",
                code="request_too_large",
            )
        except TimeoutError:
            return _error(
                408,
                "The request body did not arrive in time.",
                "invalid_request_error",
                code="request_timeout",
            )
        try:
            # Strict UTF-8 (json.loads would let surrogates through from bytes: surrogatepass).
            payload = json.loads(raw.decode("utf-8-sig"))
        except RecursionError:
            return _too_deep()
        except ValueError:  # JSONDecodeError, UnicodeDecodeError, an int of 4,300+ digits
            return _error(
                400,
                "Request body is not valid JSON.",
                "invalid_request_error",
                code="invalid_json",
            )
        where = lone_surrogate_location(raw, payload)
        if where is not None:
            return _error(
                400,
                f"Invalid request: {where}: a lone UTF-16 surrogate cannot be encoded as UTF-8.",
                "invalid_request_error",
                param=where.removesuffix(" (a key)"),
                code="invalid_value",
            )
        return payload

    def _unknown_model(self, model: str) -> Response:
        return _error(
            404,
            f"The model '{model[:100]}' does not exist; this gateway serves "
            f"'{self.settings.model_name}'.",
            "invalid_request_error",
            param="model",
            code="model_not_found",
        )

    async def _record(self, record: dict[str, Any], deadline: float, request_id: str) -> bool:
        """Write ``record`` by ``deadline``; False (logged, counted) if it could not be."""
        try:
            # The write is bounded by the request's deadline (at least ``reserve`` left).
            async with asyncio.timeout(max(deadline - time.perf_counter(), 0.0)):
                await self.audit.write(record)
        except Exception as exc:
            self.metrics.audit_errors.inc()
            why = "timed out" if isinstance(exc, TimeoutError) else f"failed ({type(exc).__name__})"
            log.error("request %s: audit write %s; 503 sent", request_id, why)
            return False
        return True

    def _not_recorded(self, what: str) -> Response:
        # Fail closed: an answer that is not on record by the deadline is not sent.
        return _error(
            503,
            f"The {what} could not be recorded in the audit log in time; nothing was sent. Retry.",
            "server_error",
            code="audit_unavailable",
        )

    async def _chat(self, request: Request, tenant: str, request_id: str, t0: float) -> Response:
        deadline = t0 + self.settings.decision_timeout
        req = await self._request(request, deadline, ChatRequest)
        if isinstance(req, Response):
            return req
        if req.model != self.settings.model_name:
            return self._unknown_model(req.model)

        runtime = self.tenants.runtimes.get(tenant)
        if runtime is None:  # the tenant was removed from the tenants file meanwhile
            return self._unauthorized()
        decide = asyncio.ensure_future(self._decide(req, runtime.agent, request_id, deadline))
        keepalive = self.settings.stream_keepalive
        if req.stream and keepalive > 0:
            try:
                done, _ = await asyncio.wait({decide}, timeout=keepalive)
            except asyncio.CancelledError:  # the request was dropped: so is its decision
                decide.cancel()
                raise
            if not done:
                # A long decision: the headers go now, keep-alive comments until the answer.
                end = _StreamEnd(self.metrics, tenant, decide)
                return _LateStream(
                    self._late_stream(decide, req, tenant, request_id, t0, deadline, end),
                    end,
                    media_type="text/event-stream",
                    headers={"cache-control": "no-cache", "x-safetygame-stream": "keepalive"},
                )
        outcome = await decide  # a cancelled request cancels the awaited decision too
        if isinstance(outcome, Response):
            return outcome
        return await self._answer(*outcome, req, tenant, request_id, t0, deadline)

    async def _decide(
        self, req: ChatRequest, agent: SafetyGame, request_id: str, deadline: float
    ) -> tuple[Decision, UpstreamClock] | Response:
        """The decision and the upstream time it took, or the 400 to send instead."""
        reserve = self.settings.audit_reserve
        clock = UpstreamClock()
        CURRENT_CLOCK.set(clock)  # this task's context (ensure_future copied the caller's)
        seed = req.safetygame.seed if req.safetygame.seed is not None else req.seed
        try:
            decision = await agent.arespond(
                [m.as_dict() for m in req.messages],
                budget=req.safetygame.budget,
                seed=seed,
                timeout=round(max(deadline - reserve - time.perf_counter(), 0.001), 3),
                max_tokens=req.length_limit,
                stop=req.stop_sequences,
            )
        except ConfigError as exc:
            if _from_upstream(exc):
                # The upstream refused the request (e.g. longer than the model's context).
                # Its text may name internal hosts: it goes to the log, not to the client.
                log.warning("request %s: the upstream rejected the request: %s", request_id, exc)
                return _error(
                    400,
                    "The model server rejected this request (for example, the conversation "
                    "is longer than the model's context).",
                    "invalid_request_error",
                    code="upstream_rejected_request",
                )
            # Bad request content the schema cannot see (e.g. a budget above the policy's).
            param = "safetygame.budget" if "budget" in str(exc) else None
            return _error(400, str(exc), "invalid_request_error", param=param, code="invalid_value")
        return decision, clock

    async def _answer(
        self,
        decision: Decision,
        clock: UpstreamClock,
        req: ChatRequest,
        tenant: str,
        request_id: str,
        t0: float,
        deadline: float,
    ) -> Response:
        """Record the decision, then send it: JSON, or SSE chunks from the first byte."""
        record = audit_record(
            decision,
            request_id=request_id,
            tenant=tenant,
            model=req.model,
            stream=req.stream,
            upstream_s=clock.busy_s,
        )
        record["reason_code"] = reason_code(decision)
        t_audit = time.perf_counter()
        if not await self._record(record, deadline, request_id):
            return self._not_recorded("decision")
        audit_s = time.perf_counter() - t_audit
        self._observe(tenant, decision)
        total = time.perf_counter() - t0
        overhead = max(total - clock.busy_s, 0.0)
        self.metrics.latency.observe(total, tenant=tenant)
        self.metrics.overhead.observe(overhead)
        headers = {
            "x-safetygame-status": decision.status.value,
            "x-safetygame-action": decision.action,
            "x-safetygame-decision-id": decision.id,
            "server-timing": (
                f"total;dur={total * 1000:.3f}, upstream;dur={clock.busy_s * 1000:.3f}, "
                f"gateway;dur={overhead * 1000:.3f}, audit;dur={audit_s * 1000:.3f}"
            ),
        }
        log.info(
            "request %s tenant=%s status=%s action=%s total_ms=%.1f upstream_ms=%.1f",
            request_id,
            tenant,
            decision.status.value,
            decision.action,
            total * 1000,
            clock.busy_s * 1000,
        )
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                iter(
                    list(
                        stream_events(decision, req.model, request_id, include_usage=include_usage)
                    )
                ),
                media_type="text/event-stream",
                headers={**headers, "cache-control": "no-cache"},
            )
        return JSONResponse(completion_body(decision, req.model, request_id), headers=headers)

    async def _late_stream(
        self,
        decide: asyncio.Future[tuple[Decision, UpstreamClock] | Response],
        req: ChatRequest,
        tenant: str,
        request_id: str,
        t0: float,
        deadline: float,
        end: _StreamEnd,
    ) -> AsyncIterator[str]:
        """The SSE body of a stream whose headers went out before its decision: comments
        (ignored by SSE clients, the official ``openai`` one included) while it runs, then the
        recorded answer's chunks, or the OpenAI error envelope as one ``data:`` event (which
        the ``openai`` client raises as ``APIError``) where a fast answer would have been a
        4xx or 503. Nothing the game did not choose is ever sent; a client that leaves
        cancels the decision. It is in flight until its last event, and counted in
        ``requests_total`` with the status that event carries (``end``)."""
        interval = self.settings.stream_keepalive
        try:
            try:
                yield ": keep-alive\n\n"  # bytes with the headers: the wait is already one interval
                while not decide.done():
                    done, _ = await asyncio.wait({decide}, timeout=interval)
                    if not done:
                        yield ": keep-alive\n\n"
                outcome = decide.result()
                response = (
                    outcome
                    if isinstance(outcome, Response)
                    else await self._answer(*outcome, req, tenant, request_id, t0, deadline)
                )
            except Exception as exc:  # after the headers: the client gets a generic error event
                log.error(
                    "request %s: unhandled %s in a late stream", request_id, type(exc).__name__
                )
                response = _error(500, "Internal error.", "server_error", code="internal_error")
            finally:
                if not decide.done():
                    decide.cancel()
            if isinstance(response, StreamingResponse):
                async for chunk in response.body_iterator:
                    yield chunk if isinstance(chunk, str) else bytes(chunk).decode("utf-8")
            else:
                yield "data: " + bytes(response.body).decode("utf-8") + "\n\n"
                yield "data: [DONE]\n\n"
            end.code = str(response.status_code)  # sent whole: the status its events carried
        finally:
            end.close()

    async def _moderate(
        self, request: Request, tenant: str, request_id: str, t0: float
    ) -> Response:
        deadline = t0 + self.settings.decision_timeout
        reserve = self.settings.audit_reserve
        req = await self._request(request, deadline, ModerationRequest)
        if isinstance(req, Response):
            return req
        if req.model is not None and req.model != self.settings.model_name:
            return self._unknown_model(req.model)
        if len(req.input) > self.settings.max_moderation_inputs:
            return _error(
                400,
                f"Too many inputs: at most {self.settings.max_moderation_inputs} per request.",
                "invalid_request_error",
                param="input",
                code="invalid_value",
            )
        runtime = self.tenants.runtimes.get(tenant)
        if runtime is None:  # the tenant was removed from the tenants file meanwhile
            return self._unauthorized()
        clock = UpstreamClock()
        token = CURRENT_CLOCK.set(clock)
        try:
            # The tenant's harm scorer: the object its chat agent scores candidates with.
            outcome = await moderate(
                runtime.agent.harm,
                runtime.policy,
                req.input,
                timeout=round(max(deadline - reserve - time.perf_counter(), 0.001), 3),
            )
        finally:
            CURRENT_CLOCK.reset(token)
        model = self.settings.model_name
        record = moderation_record(
            outcome,
            req.input,
            request_id=request_id,
            tenant=tenant,
            model=model,
            policy=runtime.policy,
            upstream_s=clock.busy_s,
        )
        t_audit = time.perf_counter()
        if not await self._record(record, deadline, request_id):
            return self._not_recorded("verdict")
        audit_s = time.perf_counter() - t_audit
        total = time.perf_counter() - t0
        self.metrics.latency.observe(total, tenant=tenant)
        if outcome.status != "ok":
            log.warning("moderation %s failed closed: %s", request_id, outcome.status)
        log.info(
            "moderation %s tenant=%s status=%s flagged=%d/%d total_ms=%.1f",
            request_id,
            tenant,
            outcome.status,
            sum(r.flagged for r in outcome.results),
            len(outcome.results),
            total * 1000,
        )
        headers = {
            "x-safetygame-status": outcome.status,
            "server-timing": (
                f"total;dur={total * 1000:.3f}, upstream;dur={clock.busy_s * 1000:.3f}, "
                f"audit;dur={audit_s * 1000:.3f}"
            ),
        }
        return JSONResponse(moderation_body(outcome, model, request_id), headers=headers)

    def _observe(self, tenant: str, decision: Decision) -> None:
        status = decision.status.value
        self.metrics.decisions.inc(tenant=tenant, status=status, action=decision.action)
        if decision.action == "refuse":
            self.metrics.refusals.inc(tenant=tenant, status=status)
        if decision.status is not Status.OK:
            log.warning(
                "decision %s failed safe: %s (%s): %s",
                decision.id,
                status,
                reason_code(decision),
                decision.reason,
            )

    async def models(self, request: Request) -> Response:
        if self._tenant(request) is None:
            return self._unauthorized()
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {
                        "id": self.settings.model_name,
                        "object": "model",
                        "created": int(self.started),
                        "owned_by": "safetygame",
                    }
                ],
            }
        )

    async def decisions(self, request: Request) -> Response:
        tenant = self._tenant(request)
        if tenant is None:
            return self._unauthorized()
        try:
            limit = int(request.query_params.get("limit", "50"))
            since_raw = request.query_params.get("since")
            since = float(since_raw) if since_raw is not None else None
        except ValueError:
            return _error(
                400,
                "limit must be an integer and since a number (epoch seconds).",
                "invalid_request_error",
                param="limit",
                code="invalid_value",
            )
        if not 1 <= limit <= self.settings.max_decisions_page:
            return _error(
                400,
                f"limit must be in [1, {self.settings.max_decisions_page}].",
                "invalid_request_error",
                param="limit",
                code="invalid_value",
            )
        # Scoped by the key: a tenant reads only its own records.
        records, truncated = await self.audit.recent_page(
            tenant, limit, since, max_bytes=self.settings.max_decisions_bytes
        )
        return JSONResponse(
            {"object": "list", "tenant": tenant, "data": records, "truncated": truncated}
        )

    async def healthz(self, request: Request) -> Response:
        """Unauthenticated: no upstream URL or model id, no paths, no error texts. 503 while
        the audit store cannot record decisions (every chat would be a 503)."""
        store = self.audit.health(stall_after=self.settings.audit_reserve)
        ok = store["state"] == "ok"
        return JSONResponse(
            {
                "status": "ok" if ok else "degraded",
                "model": self.settings.model_name,
                "tenants": len(self.tenants.runtimes),
                "audit": self.audit.url.split("://", 1)[0],
                "audit_state": store["state"],
                "audit_pending": store["pending"],
            },
            status_code=200 if ok else 503,
        )

    async def metrics_endpoint(self, request: Request) -> Response:
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    async def dashboard(self, request: Request) -> Response:
        html = (resources.files("safetygame.gateway") / "dashboard.html").read_text("utf-8")
        return HTMLResponse(html, headers={"content-security-policy": _CSP})


class _StreamEnd:
    """How a late stream ended, counted once: ``requests_in_flight`` drops and
    ``requests_total`` counts ``code``, the status its last event carried (200 for the
    answer, the error envelope's status otherwise; "499" when the client left first)."""

    def __init__(self, metrics: GatewayMetrics, tenant: str, decide: asyncio.Future[Any]) -> None:
        self.metrics = metrics
        self.tenant = tenant
        self.decide = decide
        self.code = "499"
        self.closed = False

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.decide.done():
            self.decide.cancel()
        self.metrics.in_flight.dec()
        self.metrics.requests.inc(tenant=self.tenant, code=self.code)


class _LateStream(StreamingResponse):
    """The response of a late stream (``Gateway._late_stream``): it counts itself when it
    ends, also when its body never started (the client left before the first byte)."""

    def __init__(self, body: AsyncIterator[str], end: _StreamEnd, **kwargs: Any) -> None:
        super().__init__(body, **kwargs)
        self.end = end

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.end.close()


# The dashboard loads nothing from outside the gateway.
_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'"
)


def create_app(
    backend: Backend,
    settings: GatewaySettings | None = None,
    *,
    audit: AuditStore | None = None,
    agent_factory: Callable[[Backend, Policy], SafetyGame] | None = None,
) -> Starlette:
    """The ASGI app. The caller owns ``backend`` (and closes it); the app owns the audit
    store unless one is passed in. Raises ConfigError for a bad policy or tenants file."""
    gw = Gateway(backend, settings or GatewaySettings(), audit=audit, agent_factory=agent_factory)
    app = Starlette(
        routes=[
            Route("/v1/chat/completions", gw.chat, methods=["POST"]),
            Route("/v1/moderations", gw.moderations, methods=["POST"]),
            Route("/v1/models", gw.models, methods=["GET"]),
            Route("/v1/safetygame/decisions", gw.decisions, methods=["GET"]),
            Route("/healthz", gw.healthz, methods=["GET"]),
            Route("/metrics", gw.metrics_endpoint, methods=["GET"]),
            Route("/", gw.dashboard, methods=["GET"]),
        ],
        lifespan=gw.lifespan,
        exception_handlers={
            404: _not_found,
            405: _method_not_allowed,
            500: _server_error,
        },
    )
    app.state.gateway = gw
    return app


async def _not_found(request: Request, exc: Exception) -> Response:
    return _error(404, "Not found.", "invalid_request_error", code="not_found")


async def _method_not_allowed(request: Request, exc: Exception) -> Response:
    return _error(405, "Method not allowed.", "invalid_request_error", code="method_not_allowed")


async def _server_error(request: Request, exc: Exception) -> Response:
    log.error("unhandled %s on %s", type(exc).__name__, request.url.path)
    return _error(500, "Internal error.", "server_error", code="internal_error")

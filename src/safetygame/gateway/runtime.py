"""What the gateway keeps between requests: per-tenant agents, policy hot reload, and the
metered backend wrapper that measures upstream time per request.
"""

from __future__ import annotations

import contextvars
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from safetygame.agent import SafetyGame
from safetygame.backends.base import Backend, Completion, LogLik, Message, SamplingConfig, YesNo
from safetygame.errors import BackendError, ConfigError
from safetygame.gateway.auth import KeyRing, TenantsConfig, load_tenants
from safetygame.gateway.metrics import GatewayMetrics
from safetygame.policy import Policy, load_policy

log = logging.getLogger("safetygame.gateway")


# -- upstream time per request ----------------------------------------------------------------


@dataclass
class UpstreamClock:
    """Wall time during which at least one upstream call of this request was in flight.

    Calls run concurrently (all probes at once), so summing their durations would overstate
    the upstream's share; the union of their intervals is the critical path the request
    spent waiting on the model.
    """

    active: int = 0
    busy_since: float = 0.0
    busy_s: float = 0.0
    calls: int = 0

    def enter(self) -> None:
        if self.active == 0:
            self.busy_since = time.perf_counter()
        self.active += 1
        self.calls += 1

    def leave(self) -> None:
        self.active -= 1
        if self.active == 0:
            self.busy_s += time.perf_counter() - self.busy_since


CURRENT_CLOCK: contextvars.ContextVar[UpstreamClock | None] = contextvars.ContextVar(
    "safetygame_upstream_clock", default=None
)


class MeteredBackend(Backend):
    """Wraps a backend: counts calls and errors, and feeds the request's ``UpstreamClock``."""

    def __init__(self, inner: Backend, metrics: GatewayMetrics) -> None:
        self.inner = inner
        self.metrics = metrics
        self.model_id = inner.model_id
        self.max_concurrency = inner.max_concurrency

    async def sample(
        self, messages: Sequence[Message], n: int, config: SamplingConfig
    ) -> list[Completion]:
        clock = CURRENT_CLOCK.get()
        self.metrics.upstream_calls.inc(operation="sample")
        if clock:
            clock.enter()
        try:
            return await self.inner.sample(messages, n, config)
        except BackendError as exc:
            self.metrics.upstream_errors.inc(operation="sample", error=type(exc).__name__)
            raise
        finally:
            if clock:
                clock.leave()

    async def yes_no(self, messages: Sequence[Message]) -> YesNo:
        clock = CURRENT_CLOCK.get()
        self.metrics.upstream_calls.inc(operation="yes_no")
        if clock:
            clock.enter()
        try:
            return await self.inner.yes_no(messages)
        except BackendError as exc:
            self.metrics.upstream_errors.inc(operation="yes_no", error=type(exc).__name__)
            raise
        finally:
            if clock:
                clock.leave()

    async def loglik(self, messages: Sequence[Message], continuation: str) -> LogLik:
        clock = CURRENT_CLOCK.get()
        self.metrics.upstream_calls.inc(operation="loglik")
        if clock:
            clock.enter()
        try:
            return await self.inner.loglik(messages, continuation)
        except BackendError as exc:
            self.metrics.upstream_errors.inc(operation="loglik", error=type(exc).__name__)
            raise
        finally:
            if clock:
                clock.leave()


# -- tenants and policies ---------------------------------------------------------------------


def _stamp(ref: str) -> tuple[int, int] | None:
    """(mtime_ns, size) of a policy or tenants file; None for shipped names / missing files."""
    p = Path(ref)
    if p.is_dir():
        p = p / "policy.yml"
    try:
        st = p.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


@dataclass
class TenantRuntime:
    name: str
    policy_ref: str
    policy: Policy
    agent: SafetyGame
    stamp: tuple[int, int] | None


AgentFactory = Callable[[Backend, Policy], SafetyGame]


@dataclass
class Tenants:
    """The live tenants: config, key ring, one agent per tenant; reloads files on change.

    A file that fails validation is rejected as a whole and logged with the reason; the
    tenant keeps serving the last good policy.
    """

    backend: Backend
    metrics: GatewayMetrics
    make_agent: AgentFactory
    default_policy: str
    tenants_file: Path | None = None
    config: TenantsConfig = field(init=False)
    keyring: KeyRing = field(init=False)
    runtimes: dict[str, TenantRuntime] = field(init=False)
    tenants_stamp: tuple[int, int] | None = field(init=False, default=None)
    # A changed file is read only once its stamp has held for one check: an editor (or a
    # test) writing it in place is never judged half-written.
    _seen: dict[str, tuple[int, int] | None] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        # At start-up a bad file is fatal (ConfigError): never serve without a valid policy.
        if self.tenants_file is not None:
            self.config = load_tenants(self.tenants_file, self.default_policy)
            self.tenants_stamp = _stamp(str(self.tenants_file))
        else:
            self.config = TenantsConfig.single(self.default_policy)
        self.keyring = KeyRing(self.config)
        self.runtimes = {n: self._runtime(n, t.policy) for n, t in self.config.tenants.items()}

    def _runtime(self, name: str, ref: str) -> TenantRuntime:
        stamp = _stamp(ref)
        policy = load_policy(ref)
        return TenantRuntime(name, ref, policy, self.make_agent(self.backend, policy), stamp)

    def check(self) -> list[str]:
        """Reload whatever changed on disk; returns one line per reload or rejection.

        Blocking (file reads, YAML, building agents and the scorers they load): the gateway
        runs it in a worker thread. It only ever swaps whole objects (the runtimes dict, the
        key ring), so the event loop reads either the old state or the new one."""
        events: list[str] = []
        if self.tenants_file is not None:
            stamp = _stamp(str(self.tenants_file))
            if stamp != self.tenants_stamp and self._settled(str(self.tenants_file), stamp):
                self.tenants_stamp = stamp
                events += self._reload_tenants()
        for name, rt in list(self.runtimes.items()):
            stamp = _stamp(rt.policy_ref)
            if stamp == rt.stamp or not self._settled(rt.policy_ref, stamp):
                continue
            rt.stamp = stamp
            try:
                policy = load_policy(rt.policy_ref)
            except ConfigError as exc:
                self.metrics.policy_reloads.inc(tenant=name, result="rejected")
                msg = f"tenant {name}: policy change rejected, keeping {rt.policy.ref}: {exc}"
                log.warning(msg)
                events.append(msg)
                continue
            if policy.digest != rt.policy.digest:
                old = rt.policy.ref
                # a new runtime swapped in whole: a request never sees a policy with the
                # other policy's agent (check() runs in a worker thread)
                self.runtimes = {
                    **self.runtimes,
                    name: dataclasses.replace(
                        rt, policy=policy, agent=self.make_agent(self.backend, policy)
                    ),
                }
                self.metrics.policy_reloads.inc(tenant=name, result="ok")
                msg = f"tenant {name}: policy reloaded {old} -> {policy.ref}"
                log.info(msg)
                events.append(msg)
        return events

    def _settled(self, path: str, stamp: tuple[int, int] | None) -> bool:
        """True when ``path`` had this stamp at the previous check as well."""
        settled = self._seen.get(path, ()) == stamp
        self._seen[path] = stamp
        return settled

    def _reload_tenants(self) -> list[str]:
        assert self.tenants_file is not None
        try:
            config = load_tenants(self.tenants_file, self.default_policy)
            runtimes = {
                n: (
                    self.runtimes[n]
                    if n in self.runtimes and self.runtimes[n].policy_ref == t.policy
                    else self._runtime(n, t.policy)
                )
                for n, t in config.tenants.items()
            }
        except ConfigError as exc:
            self.metrics.policy_reloads.inc(tenant="*", result="rejected")
            msg = f"tenants file change rejected, keeping the previous tenants: {exc}"
            log.warning(msg)
            return [msg]
        self.config, self.keyring, self.runtimes = config, KeyRing(config), runtimes
        self.metrics.policy_reloads.inc(tenant="*", result="ok")
        msg = f"tenants file reloaded: {len(runtimes)} tenant(s)"
        log.info(msg)
        return [msg]

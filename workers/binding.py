"""Bind: what a claimed command (or its compensation) runs with — limits, environment, trace.

Shared by the pipeline and the compensation runner, so both bind the same way: the tenant's
env, then the command's, then (for the command only) its secret values from the message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry import trace as otel_trace

from producer import logs, policy, tracing
from producer.redaction import MaskLevel, Redactor
from producer.tenants import Tenant
from producer.tracing import TraceContext, new_span_id, parse_traceparent, sampled_by_default
from workers.sandbox import ExecRequest, Limits, detect_capabilities
from workers.sandbox.model import FsView


@dataclass(frozen=True)
class Delivery:
    """A message's content after validation; still only a claim to be checked in the store."""

    command_id: str
    tenant: str
    secrets: Mapping[str, str]
    traceparent: str | None
    tracestate: str | None = None


def redactor_for(tenant: Tenant, secrets: Mapping[str, str]) -> Redactor:
    """What scrubs a delivery's logs, audit events and spans: its secrets, and masking at the
    tenant's level — "off" applies to stored output only, so it means L1 here."""
    level = MaskLevel(tenant.masking)
    return Redactor(secrets, level=MaskLevel.L1 if level is MaskLevel.OFF else level)


def parent_context(stored_trace_id: str | None, delivery: Delivery) -> TraceContext | None:
    """The context a run continues: the store's trace id wins over the message's."""
    parent = parse_traceparent(delivery.traceparent, delivery.tracestate)
    if stored_trace_id is None:
        return parent
    if parent is not None and parent.trace_id == stored_trace_id:
        return parent
    # A message without headers (republished by the outbox) or with a foreign trace.
    return TraceContext(stored_trace_id, new_span_id(), sampled_by_default(stored_trace_id))


def pool_index() -> int:
    """This pool process's index in its worker (0 outside a prefork pool)."""
    from billiard.process import current_process  # noqa: PLC0415

    index = getattr(current_process(), "index", None)
    return index if isinstance(index, int) and index >= 0 else 0


def run_as_for(tenant: Tenant) -> tuple[int, int] | None:
    """The (uid, gid) this pool process runs the tenant's commands as, if it has a range.

    One uid per pool slot within the range: two commands running at once under one tenant
    then cannot read each other's files or environment, nor signal each other.
    """
    if tenant.run_as is None:
        return None
    span = tenant.run_as.uid_max - tenant.run_as.uid_min + 1
    return tenant.run_as.uid_min + pool_index() % span, tenant.run_as.gid


def fs_view_for(tenant: Tenant) -> FsView | None:
    """The filesystem view the tenant's commands get here, None for the host's.

    Without a working bubblewrap a tenant that requires the view never gets this far (its
    worker refused to start); one that prefers it runs in the host's view, as the worker's
    ready line says.
    """
    view = tenant.filesystem
    if view is None or detect_capabilities().bwrap is None:
        return None
    # The message signing key is the worker's, never the command's.
    key_file = os.environ.get("EXECQ_SIGNING_KEY_FILE", "")
    hidden = view.hidden + ((key_file,) if key_file.startswith("/") else ())
    return FsView(tmp_mb=view.tmp_mb, writable=view.writable, hidden=hidden)


def exec_request(
    tenant: Tenant,
    *,
    command_id: str,
    argv: tuple[str, ...],
    env: Mapping[str, str],
    parent: TraceContext | None,
    timeout_s: float | None,
    cpu_s: int | None,
    memory_mb: int | None,
) -> ExecRequest:
    """The sandbox request: the tenant's ceilings applied, TRACEPARENT under the current span."""
    limits = policy.effective_limits(tenant, timeout_s=timeout_s, cpu_s=cpu_s, memory_mb=memory_mb)
    full: dict[str, str] = dict(tenant.env)
    full.update(env)
    if parent is not None:
        # The child continues the trace under this worker's span (when one is recorded).
        child = tracing.child_context(otel_trace.get_current_span(), parent)
        full["TRACEPARENT"] = child.traceparent
        if child.tracestate:
            full["TRACESTATE"] = child.tracestate
        logs.bind(trace_id=child.trace_id, span_id=child.span_id)
    lang = full.pop("LANG", "C.UTF-8")
    return ExecRequest(
        run_as=run_as_for(tenant),
        network=tenant.network,
        filesystem=fs_view_for(tenant),
        command_id=command_id,
        argv=argv,
        allowed_executables=tenant.executables,
        # The policy's EffectiveLimits and the sandbox's Limits have the same fields; the
        # two types stay apart because producer must not import workers.
        limits=Limits(**vars(limits)),  # flat values: no deep copy (asdict) per command
        env=full,
        lang=lang,
    )

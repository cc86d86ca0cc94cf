"""Every error execq raises: one root, an area sub-base each, one line on when it is raised."""

from __future__ import annotations

from producer.settings import ConfigInvalid


class ExecqError(Exception):
    """Raised for anything execq refuses or cannot do; the root of every execq error."""


# --- settings and configuration -------------------------------------------------------


class ConfigError(ExecqError, ConfigInvalid):
    """Raised when a setting or the tenants file is invalid; the message names the setting."""


# --- the command contract -------------------------------------------------------------


class SpecError(ExecqError, ValueError):
    """Raised when a CommandSpec is malformed (argv, env, limits, sizes)."""


class UnknownTenant(SpecError):
    """Raised when a spec names a tenant that the tenants file does not define.

    A malformed spec, not a policy refusal: submit stores and audits nothing for it.
    """


class PolicyDenied(ExecqError):
    """Raised when a well-formed spec breaks its tenant's policy; the refusal is recorded."""

    def __init__(
        self,
        message: str,
        *,
        rule: str,
        command_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.rule = rule
        self.command_id = command_id
        # Set when waiting helps (a rate limit): how long until the same submit would pass.
        self.retry_after_s = retry_after_s


class IdempotencyConflict(ExecqError):
    """Raised when an idempotency key is reused with a different spec."""

    def __init__(self, message: str, *, command_id: str) -> None:
        super().__init__(message)
        self.command_id = command_id


# --- the results store ----------------------------------------------------------------


class StoreError(ExecqError):
    """Raised when the results store cannot do what was asked."""


class NotFound(StoreError):
    """Raised when no command (or API token) has the given id."""


class AmbiguousId(NotFound):
    """Raised when an id prefix begins the ids of several commands (or batches); it names
    some of them. A NotFound: no single one has that id."""

    def __init__(self, message: str, *, candidates: list[str]) -> None:
        super().__init__(message)
        self.candidates = candidates


class DuplicateName(StoreError):
    """Raised when a name that must be unique is taken (an API token's, within its tenant)."""


class IllegalTransition(StoreError):
    """Raised when a state change is not allowed by the state table."""


class StaleVersion(StoreError):
    """Raised when a conditional update lost the race: state or version changed meanwhile."""


class InvalidOperation(ExecqError):
    """Raised when an operator action does not apply to the command's current state."""


class InvalidEventId(ExecqError, ValueError):
    """Raised when a live-output event id to resume after (Last-Event-ID) is not one execq
    gives out."""


# --- the broker -----------------------------------------------------------------------


class BrokerUnavailable(ExecqError):
    """Raised when Redis cannot be reached in time (submit never raises it: see the outbox)."""


# --- the sandbox ----------------------------------------------------------------------


class SandboxError(ExecqError):
    """Raised when the sandbox cannot start or refuses a command."""


class ExecutableRefused(SandboxError):
    """Raised when argv[0] does not resolve to a safe, allow-listed executable."""


class IsolationUnavailable(SandboxError):
    """Raised when a tenant requires an isolation mechanism this host cannot provide."""

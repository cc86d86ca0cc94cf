"""Key settings: the master key that seals secret values in messages (`EXECQ_SECRETS_KEY` or
`EXECQ_SECRETS_KEY_FILE`) and the key of the audit chains (`EXECQ_AUDIT_KEY` or
`EXECQ_AUDIT_KEY_FILE`), with where the audit chains' checkpoints go; without a key, a local key
file beside the default store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.settings import ConfigInvalid, describe_validation_error, in_project
from producer.signing_settings import read_key

KEY_HELP = (
    "Master key sealing secret values in messages (>= 32 bytes, the same on producers and "
    "workers); each tenant's key is derived from it."
)


class KeySettings(BaseSettings):
    """Read apart from Settings: only what publishes or consumes messages needs the key."""

    model_config = SettingsConfigDict(env_prefix="EXECQ_", extra="ignore", frozen=True)

    secrets_key: SecretStr | None = Field(default=None, description=KEY_HELP)
    secrets_key_file: Path | None = Field(
        default=None, description="A file holding the key (e.g. a Docker or Kubernetes secret)."
    )

    @model_validator(mode="after")
    def _one_source(self) -> KeySettings:
        if self.secrets_key is not None and self.secrets_key_file is not None:
            raise ValueError("set EXECQ_SECRETS_KEY or EXECQ_SECRETS_KEY_FILE, not both")
        return self

    def key(self) -> bytes | None:
        """The configured key's bytes, or None (use the local key file); ConfigInvalid else."""
        return read_key("EXECQ_SECRETS_KEY", self.secrets_key, self.secrets_key_file)


AUDIT_KEY_HELP = (
    "Key of the audit chains (>= 32 bytes, the same on every process that writes or verifies "
    "the trail): event links are HMAC-SHA256 under a key derived from it."
)


class AuditKeySettings(BaseSettings):
    """The audit chains' key, and the witness their checkpoints are written to."""

    model_config = SettingsConfigDict(env_prefix="EXECQ_", extra="ignore", frozen=True)

    audit_key: SecretStr | None = Field(default=None, description=AUDIT_KEY_HELP)
    audit_key_file: Path | None = Field(
        default=None, description="A file holding the audit key (e.g. a Kubernetes secret)."
    )
    audit_witness: Path = Field(
        default=Path(".execq/audit-witness.jsonl"),
        description="Append-only JSON lines of signed checkpoints of every audit chain's head; "
        "ship it off the host (a log shipper, a write-once bucket).",
    )
    audit_checkpoint_s: float = Field(
        default=5.0,
        gt=0,
        le=3600,
        description="A worker checkpoints a chain it appends to when its last checkpoint of "
        "that chain is older than this.",
    )

    @model_validator(mode="before")
    @classmethod
    def _in_project(cls, data: Any) -> Any:
        return in_project(cls, data)

    @model_validator(mode="after")
    def _one_source(self) -> AuditKeySettings:
        if self.audit_key is not None and self.audit_key_file is not None:
            raise ValueError("set EXECQ_AUDIT_KEY or EXECQ_AUDIT_KEY_FILE, not both")
        return self

    def key(self) -> bytes | None:
        """The configured audit key's bytes, or None (use the local key file)."""
        return read_key("EXECQ_AUDIT_KEY", self.audit_key, self.audit_key_file)


def load_keys() -> KeySettings:
    """The key settings from the environment; ConfigInvalid naming the bad variable."""
    try:
        return KeySettings()
    except ValidationError as exc:
        raise ConfigInvalid(describe_validation_error(exc)) from None


def load_audit_keys() -> AuditKeySettings:
    """The audit key settings from the environment; ConfigInvalid naming the bad variable."""
    try:
        return AuditKeySettings()
    except ValidationError as exc:
        raise ConfigInvalid(describe_validation_error(exc)) from None

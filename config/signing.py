"""Message signing settings: the deployment's HMAC key (`EXECQ_SIGNING_KEY` or
`EXECQ_SIGNING_KEY_FILE`) and how long a signed message stays valid."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from config.settings import ConfigInvalid, describe_validation_error

MIN_KEY_BYTES = 32


class SigningSettings(BaseSettings):
    """Read apart from Settings: only what publishes or consumes messages needs the key."""

    model_config = SettingsConfigDict(env_prefix="EXECQ_", extra="ignore", frozen=True)

    signing_key: SecretStr | None = Field(
        default=None, description="HMAC key shared by producers and workers (>= 32 bytes)."
    )
    signing_key_file: Path | None = Field(
        default=None, description="A file holding the key (e.g. a Docker or Kubernetes secret)."
    )
    message_ttl_s: float = Field(
        default=3600.0,
        gt=0,
        le=7 * 86_400,
        description="A signed message is refused after this long; the outbox re-sends its "
        "command (still pending in the store) with a fresh signature.",
    )

    @model_validator(mode="after")
    def _one_source(self) -> SigningSettings:
        if self.signing_key is not None and self.signing_key_file is not None:
            raise ValueError("set EXECQ_SIGNING_KEY or EXECQ_SIGNING_KEY_FILE, not both")
        return self

    def key(self) -> bytes | None:
        """The key's bytes, or None when signing is off; ConfigInvalid naming the problem."""
        if self.signing_key_file is not None:
            try:
                raw = self.signing_key_file.read_bytes().strip()
            except OSError as exc:
                raise ConfigInvalid(
                    f"invalid setting EXECQ_SIGNING_KEY_FILE: cannot read "
                    f"{self.signing_key_file}: {exc.strerror}"
                ) from None
            name = "EXECQ_SIGNING_KEY_FILE"
        elif self.signing_key is not None:
            raw = self.signing_key.get_secret_value().encode()
            name = "EXECQ_SIGNING_KEY"
        else:
            return None
        if len(raw) < MIN_KEY_BYTES:
            raise ConfigInvalid(
                f"invalid setting {name}: the key has {len(raw)} bytes, at least "
                f"{MIN_KEY_BYTES} are needed (e.g. `openssl rand -hex 32`)"
            )
        return raw


def load_signing() -> SigningSettings:
    """The signing settings from the environment; ConfigInvalid naming the bad variable."""
    try:
        return SigningSettings()
    except ValidationError as exc:
        raise ConfigInvalid(describe_validation_error(exc)) from None

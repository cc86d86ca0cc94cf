"""Key settings: the master key that seals secret values in messages (`EXECQ_SECRETS_KEY` or
`EXECQ_SECRETS_KEY_FILE`); without either, a local key file beside the default store."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from config.settings import ConfigInvalid, describe_validation_error
from config.signing import MIN_KEY_BYTES

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
        if self.secrets_key_file is not None:
            name = "EXECQ_SECRETS_KEY_FILE"
            try:
                raw = self.secrets_key_file.read_bytes().strip()
            except OSError as exc:
                raise ConfigInvalid(
                    f"invalid setting {name}: cannot read {self.secrets_key_file}: {exc.strerror}"
                ) from None
        elif self.secrets_key is not None:
            name = "EXECQ_SECRETS_KEY"
            raw = self.secrets_key.get_secret_value().encode()
        else:
            return None
        if len(raw) < MIN_KEY_BYTES:
            raise ConfigInvalid(
                f"invalid setting {name}: the key has {len(raw)} bytes, at least "
                f"{MIN_KEY_BYTES} are needed (e.g. `openssl rand -hex 32`)"
            )
        return raw


def load_keys() -> KeySettings:
    """The key settings from the environment; ConfigInvalid naming the bad variable."""
    try:
        return KeySettings()
    except ValidationError as exc:
        raise ConfigInvalid(describe_validation_error(exc)) from None

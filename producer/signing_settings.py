"""Message signing settings: the deployment's HMAC key (`EXECQ_SIGNING_KEY` or
`EXECQ_SIGNING_KEY_FILE`) and how long a signed message stays valid."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.settings import ConfigInvalid, describe_validation_error

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
    signing_accepted_keys: SecretStr | None = Field(
        default=None,
        description="More keys a message may be signed with, comma-separated (a rotation in "
        "progress); they verify, never sign.",
    )
    signing_accepted_keys_file: Path | None = Field(
        default=None, description="A file holding the accepted keys, one per line."
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
        if self.signing_accepted_keys is not None and self.signing_accepted_keys_file is not None:
            raise ValueError(
                "set EXECQ_SIGNING_ACCEPTED_KEYS or EXECQ_SIGNING_ACCEPTED_KEYS_FILE, not both"
            )
        return self

    def key(self) -> bytes | None:
        """The key's bytes, or None when signing is off; ConfigInvalid naming the problem."""
        return read_key("EXECQ_SIGNING_KEY", self.signing_key, self.signing_key_file)

    def accepted_keys(self) -> tuple[bytes, ...]:
        """The keys accepted besides the signing key; ConfigInvalid naming the problem."""
        if self.signing_accepted_keys_file is not None:
            name = "EXECQ_SIGNING_ACCEPTED_KEYS_FILE"
            raw = _read(self.signing_accepted_keys_file, name).splitlines()
        elif self.signing_accepted_keys is not None:
            name = "EXECQ_SIGNING_ACCEPTED_KEYS"
            raw = self.signing_accepted_keys.get_secret_value().encode().split(b",")
        else:
            return ()
        keys = [k.strip() for k in raw if k.strip()]
        if self.key() is None and keys:
            raise ConfigInvalid(f"invalid setting {name}: accepted keys need a signing key too")
        return tuple(_long_enough(k, f"{name} (key {i})") for i, k in enumerate(keys, 1))


def read_key(name: str, value: SecretStr | None, file: Path | None) -> bytes | None:
    """The key from `<name>_FILE` or `<name>`, or None; ConfigInvalid naming the variable."""
    if file is not None:
        name = f"{name}_FILE"
        raw = _read(file, name)
    elif value is not None:
        raw = value.get_secret_value().encode()
    else:
        return None
    return _long_enough(raw, name)


def _read(path: Path, name: str) -> bytes:
    try:
        return path.read_bytes().strip()
    except OSError as exc:
        raise ConfigInvalid(f"invalid setting {name}: cannot read {path}: {exc.strerror}") from None


def _long_enough(raw: bytes, name: str) -> bytes:
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

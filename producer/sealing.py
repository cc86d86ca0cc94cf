"""Secret values travel sealed: AES-GCM under a key per tenant, derived from a master key.

Redis is untrusted: anyone who can read it (another tenant's command, an AOF file, a backup)
must not learn a secret. The producer seals a message's secret values with its tenant's key
(HKDF-SHA256 of the master key), bound to the command id and tenant as associated data, so a
sealed value moved to another command or tenant does not open. A worker keeps only its own
tenant's key: a worker of tenant B cannot open tenant A's secrets even with its memory read.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets as random
import tempfile
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy.engine import make_url

from producer.files import private_dir
from producer.keys import load_keys
from producer.settings import Settings, project_path

VERSION = "v1"
NONCE_BYTES = 12
KEY_FILE = "secrets.key"


class Unsealable(ValueError):
    """Raised when a sealed value does not open: another key, command or tenant, or altered."""


def tenant_key(master: bytes, tenant: str) -> bytes:
    """The tenant's 256-bit key: HKDF-SHA256 of the master key, labelled with the tenant."""
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=f"execq/secrets/{VERSION}/{tenant}".encode(),
    ).derive(master)


class Sealer:
    """Seals and opens secret values, for every tenant (producers) or one (a worker)."""

    def __init__(self, master: bytes | None, *, only: str | None = None) -> None:
        self._master = master
        self._keys: dict[str, AESGCM] = {}
        self._only = only
        if only is not None and master is not None:
            # A worker derives its own tenant's key and forgets the master key.
            self._keys[only] = AESGCM(tenant_key(master, only))
            self._master = None

    def for_tenant(self, tenant: str) -> Sealer:
        """A sealer holding only `tenant`'s key (what a worker of that tenant keeps)."""
        if self._master is None:
            raise ValueError("this sealer holds no master key to derive from")
        return Sealer(self._master, only=tenant)

    def _aead(self, tenant: str) -> AESGCM:
        aead = self._keys.get(tenant)
        if aead is None:
            if self._master is None:
                raise Unsealable(f"this process holds no key for tenant {tenant!r}")
            try:
                aead = self._keys[tenant] = AESGCM(tenant_key(self._master, tenant))
            except UnicodeEncodeError:  # a forged tenant name; a producer's is validated
                raise Unsealable(f"{tenant!r} is not a tenant name") from None
        return aead

    def seal(self, command_id: str, tenant: str, values: Mapping[str, str]) -> str:
        """`values` as one opaque string: version, nonce and ciphertext (base64url)."""
        nonce = os.urandom(NONCE_BYTES)
        plain = json.dumps(dict(values), separators=(",", ":")).encode()
        sealed = self._aead(tenant).encrypt(nonce, plain, _bound(command_id, tenant))
        return f"{VERSION}.{base64.urlsafe_b64encode(nonce + sealed).decode()}"

    def open(self, command_id: str, tenant: str, sealed: str) -> dict[str, str]:
        """The values sealed for this command and tenant; Unsealable otherwise."""
        version, _, body = sealed.partition(".")
        if version != VERSION:
            raise Unsealable(f"unknown sealing version {version[:10]!r}")
        aead = self._aead(tenant)
        try:
            raw = base64.urlsafe_b64decode(body.encode("ascii"))
            plain = aead.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], _bound(command_id, tenant))
        except (InvalidTag, ValueError, UnicodeEncodeError):
            raise Unsealable(
                "sealed secrets do not open with this tenant's key (another key, command or "
                "tenant, or altered)"
            ) from None
        values = json.loads(plain)
        if not isinstance(values, dict):
            raise Unsealable("sealed secrets are not a mapping")
        return values


def _bound(command_id: str, tenant: str) -> bytes:
    return f"{command_id}\x00{tenant}".encode()


def key_dir(settings: Settings) -> Path:
    """Where local key files live: `keys/` beside a SQLite store, else `.execq/keys`."""
    return key_dir_of(settings.database_url)


def key_dir_of(database_url: str) -> Path:
    """`key_dir` for a store URL."""
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return Path(url.database).parent / "keys"
    return project_path(Path(".execq/keys"))


def local_key(directory: Path, name: str = KEY_FILE) -> bytes:
    """The key in `directory/name`, created (0600, directory 0700) when missing."""
    path = directory / name
    private_dir(directory)
    if not path.exists():
        # Written whole under another name, then linked: a process starting at the same
        # moment reads either no file or the whole key, and both end up with the same one.
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.stem}.")
        try:
            os.write(fd, random.token_hex(32).encode() + b"\n")
            os.fchmod(fd, 0o600)
            os.close(fd)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    return path.read_bytes().strip()


def sealer_from_env(settings: Settings) -> Sealer:
    """The deployment's sealer: EXECQ_SECRETS_KEY[_FILE], else the local key file."""
    master = load_keys().key()
    if master is None:
        master = local_key(key_dir(settings))
    return Sealer(master)

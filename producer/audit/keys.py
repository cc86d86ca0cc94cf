"""The audit key: event links are HMAC-SHA256, and checkpoints, anchors and file heads signed.

Two keys are derived from the one audit key (`EXECQ_AUDIT_KEY[_FILE]`, else `audit.key` in the
local key directory): the *chain* key links events, and travels to PostgreSQL with each append
(the server computes the links inside the append statement); the *seal* key signs checkpoints,
prune anchors and file heads, and never leaves execq's processes. Someone who reads the chain
key off the database server can forge links, but not the checkpoints that pin a chain's head.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from producer.audit.events import canonical_json
from producer.keys import load_audit_keys
from producer.sealing import key_dir_of, local_key

KEY_FILE = "audit.key"
VERSION = "v1"
_BLOCK = 64  # SHA-256's block size: HMAC pads its key to this


def _derive(master: bytes, label: str) -> bytes:
    return HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=None,
        info=f"execq/audit/{VERSION}/{label}".encode(),
    ).derive(master)


@dataclass(frozen=True)
class AuditKeys:
    """The chain key and the seal key of one deployment."""

    chain: bytes = field(repr=False)
    seal: bytes = field(repr=False)

    @classmethod
    def derive(cls, master: bytes) -> AuditKeys:
        """Both keys from the audit key."""
        return cls(_derive(master, "chain"), _derive(master, "seal"))

    def link(self, data: bytes) -> str:
        """HMAC-SHA256 of an event's link message under the chain key, hex."""
        return hmac.digest(self.chain, data, "sha256").hex()

    def sign(self, record: dict[str, Any]) -> str:
        """HMAC-SHA256 of a record's canonical JSON (without its `mac`) under the seal key."""
        return hmac.digest(self.seal, _signed_bytes(record), "sha256").hex()

    def signed(self, record: dict[str, Any]) -> bool:
        """Whether `record["mac"]` is the seal key's signature of the rest of the record."""
        mac = record.get("mac")
        return isinstance(mac, str) and hmac.compare_digest(mac, self.sign(record))

    @cached_property
    def sql_pads(self) -> tuple[bytes, bytes]:
        """(key XOR ipad, key XOR opad): HMAC as two SHA-256 calls, for the SQL side."""
        key = self.chain.ljust(_BLOCK, b"\0")
        return bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key)


def _signed_bytes(record: dict[str, Any]) -> bytes:
    return canonical_json({k: v for k, v in record.items() if k != "mac"}).encode()


# The keys a worker read at start, before it wiped the key variables from its environment
# (its pool processes inherit them when they fork). A worker serves one store.
_preloaded: list[AuditKeys] = []


def preload(database_url: str) -> None:
    """Read the audit keys now and keep them for this process and the ones it forks."""
    _preloaded[:] = [load(database_url)]


def load(database_url: str) -> AuditKeys:
    """The deployment's audit keys: EXECQ_AUDIT_KEY[_FILE], else the local key file."""
    if _preloaded:
        return _preloaded[0]
    master = load_audit_keys().key()
    if master is None:
        master = local_key(key_dir_of(database_url), KEY_FILE)
    return AuditKeys.derive(master)


def fingerprint(keys: AuditKeys) -> str:
    """A short public name of the keys (which key signed what), revealing nothing of them."""
    return hashlib.sha256(b"execq-audit-key-id\n" + keys.seal).hexdigest()[:12]

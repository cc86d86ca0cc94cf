"""What a worker checks at start before it runs a tenant's commands as other uids.

A tenant with `run_as` runs each command as an unprivileged uid of its range. If that uid
could read the results store, the audit log or a key, any of its commands could read every
tenant's output, parameters and audit trail, or forge messages: the worker refuses to start.
"""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy.engine import make_url

from producer.files import readable_by
from producer.keys import load_audit_keys, load_keys
from producer.sealing import key_dir
from producer.settings import Settings
from producer.signing_settings import load_signing
from producer.tenants import Tenant

# A range is checked uid by uid up to this many (ranges are pool-sized in practice).
MAX_UIDS_CHECKED = 4096


def private_paths(settings: Settings) -> list[Path]:
    """The store, audit and key files a command must never read (those that exist)."""
    paths: list[Path] = []
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        db = Path(url.database)
        paths += [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
    if settings.audit_log is not None:
        paths.append(settings.audit_log)
    # Every local key file (the sealing key, the audit key), whatever its name.
    local_keys = key_dir(settings)
    if local_keys.is_dir():
        paths += sorted(p for p in local_keys.iterdir() if p.is_file())
    for named in (
        load_keys().secrets_key_file,
        load_audit_keys().audit_key_file,
        load_signing().signing_key_file,
    ):
        if named is not None:
            paths.append(named)
    return [p for p in paths if p.exists()]


def exposed(settings: Settings, tenant: Tenant) -> list[str]:
    """One sentence per private file a uid of the tenant's `run_as` range could read."""
    if tenant.run_as is None:
        return []
    r = tenant.run_as
    last = min(r.uid_max, r.uid_min + MAX_UIDS_CHECKED - 1)
    found = []
    for path in private_paths(settings):
        if _hidden_by_view(path, tenant):
            continue
        uid = next((u for u in range(r.uid_min, last + 1) if readable_by(path, u, r.gid)), None)
        if uid is not None:
            found.append(
                f"{path} is readable by uid {uid} (tenant {tenant.name!r}'s run_as): make it "
                "and its directory private to the worker's user (chmod 600 / 700)"
            )
    return found


def _hidden_by_view(path: Path, tenant: Tenant) -> bool:
    """Whether the tenant's required filesystem view puts an empty directory over `path`."""
    view = tenant.filesystem
    if view is None or not view.required:
        return False  # without a view (or where it may be missing) the host's files show
    target = os.path.realpath(path)
    # Each an empty tmpfs inside the view (a path compared, never opened).
    covered = ("/tmp", "/run", *view.hidden)  # noqa: S108
    return any(target.startswith(os.path.realpath(root).rstrip("/") + "/") for root in covered)

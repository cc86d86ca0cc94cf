"""execq imports cleanly beside a web backend's own top-level `config` package.

Django's common project template puts settings in `config/settings/`; with that directory first
on `sys.path`, `from producer import Producer` once failed with
`ImportError: cannot import name 'ConfigInvalid' from 'config.settings'`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_producer_and_workers_import_beside_a_django_config_package(tmp_path: Path) -> None:
    settings = tmp_path / "config" / "settings"
    settings.mkdir(parents=True)
    (tmp_path / "config" / "__init__.py").write_text("")
    (settings / "__init__.py").write_text("")
    (settings / "base.py").write_text("DEBUG = False\nSECRET_KEY = 'django-insecure'\n")
    (tmp_path / "manage.py").write_text("")
    script = f"PROJECT = {str(tmp_path)!r}\n" + textwrap.dedent(
        """
        import config.settings.base as django_settings
        from producer import CommandSpec, Producer
        from producer.errors import ConfigError
        import workers.tasks
        import config
        # The project's own package is the one `config` names, and execq still works.
        assert config.__file__.startswith(PROJECT), config.__file__
        assert django_settings.DEBUG is False
        CommandSpec(tenant="acme", argv=["/bin/echo", "hi"])
        print("ok", Producer.__name__, ConfigError.__name__)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXECQ_")}
    # The project directory first, as `manage.py` or a WSGI server puts it.
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok Producer ConfigError"

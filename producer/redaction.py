"""Scrubbing a command's secret values from everything that leaves the worker.

Exact values are replaced, and so are their common encodings (base64 at any alignment,
URL-encoding), because a command that prints `base64 <<< $TOKEN` leaks it just the same.
Pattern masking (tokens, e-mail, phone numbers...) builds on this in the audit work.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from urllib.parse import quote, quote_plus

# A base64 fragment shorter than this could match ordinary text by chance.
_MIN_B64_CORE = 8


def _b64_cores(raw: bytes) -> set[str]:
    """The part of base64(raw) that is the same wherever raw sits in a longer stream."""
    cores = set()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        for offset in range(3):
            text = encode(b"\0" * offset + raw).decode()
            # Leading chars mix in the preceding bytes, trailing ones the following bytes.
            start = -(-offset * 4 // 3)  # ceil(offset * 4 / 3)
            full = (offset + len(raw)) // 3 * 4
            core = text[start:full]
            if len(core) >= _MIN_B64_CORE:
                cores.add(core)
    return cores


class Redactor:
    """Replaces each secret value (and encodings of it) with `[secret:NAME]`."""

    def __init__(self, secrets: Mapping[str, str]) -> None:
        forms: dict[str, str] = {}
        for name, value in secrets.items():
            if not value:
                continue
            # The mark must not itself contain the value, or scrubbing would put it back.
            mark = next(
                m for m in (f"[secret:{name}]", "[redacted]", "\u2588" * 3) if value not in m
            )
            for form in {value, quote(value, safe=""), quote_plus(value)}:
                forms.setdefault(form, mark)
            for core in _b64_cores(value.encode()):
                forms.setdefault(core, mark)
        # Longest first, so a value is replaced whole before any shorter value inside it.
        ordered = sorted(forms, key=len, reverse=True)
        self._marks = forms
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None

    def scrub(self, text: str | None) -> tuple[str | None, bool]:
        """The text without secrets, and whether anything was replaced."""
        if text is None or self._pattern is None:
            return text, False
        result, count = self._pattern.subn(lambda m: self._marks[m.group(0)], text)
        return result, count > 0

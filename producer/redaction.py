"""Scrubbing secrets and masking sensitive patterns in everything that leaves the worker.

`Redactor.scrub` works in two layers, in this order:

1. **Exact secrets, always**: each declared secret value becomes `[secret:NAME]`, and so do its
   common encodings (JSON string escapes, with `/` escaped or not and non-ASCII as `\\uXXXX` or
   not; shell quoting; URL-encoding; base64 at any alignment), because a command that prints
   `base64 <<< $TOKEN` or `json.dumps(token)` leaks it just the same. No level turns this off.
   `secret_spans` finds the same forms in raw output bytes, for capture to scrub before it cuts.
2. **Pattern masking**, chosen by `MaskLevel` (a tenant's `masking` setting); `off` skips it.

   Secret-like text is masked whole at L1, L2 and L3 alike:

   - Authorization headers with `Bearer`/`Token` (-> `[masked:token]`) or `Basic`
     (-> `[masked:credentials]`), and `bearer <token>` anywhere when the token has a digit;
   - API keys of well-known shapes (-> `[masked:api-key]`): `sk-...`, `sk_live_`/`sk_test_`/
     `rk_live_`/`rk_test_`, GitHub `ghp_ gho_ ghu_ ghs_ ghr_` and `github_pat_`, Slack `xox?-`,
     AWS `AKIA`/`ASIA`, Google `AIza`; JWTs (-> `[masked:jwt]`);
   - the value of `key=value`, `key: value`, `"key": "value"` or `key => value` when the key
     ends in api_key, access_key, secret_key, private_key (any of `_.-` or none), token,
     secret, password, passphrase, passwd or pwd (-> `[masked:secret]`); `PWD` and `OLDPWD`
     are the shell's directories and stay;
   - URL passwords (`postgresql://user:***@host/db`, `redis://:***@host`);
   - PEM/PGP private key blocks (-> `[masked:private-key]`; to the end of the text when the END
     line was cut off).

   Personal data is masked by level:

   ======  =====================  =============  ==================  ===========  =============
   level   e-mail                 phone          CN resident ID      US SSN       UK NINO
   ======  =====================  =============  ==================  ===========  =============
   L1      ali***@***example.com  138****5678    110***********002X  ***-**-6789  *****456C
   L2      ***@***example.com     *******5678    **************002X  ***-**-6789  *****456C
   L3      [email]                [phone]        [national-id]       (same)       (same)
   ======  =====================  =============  ==================  ===========  =============

   - e-mail: L1 keeps up to 3 leading characters of the local part, always masking at least
     one, and both levels keep the last two labels of the domain (three for `co.uk`-style
     domains). `user@localhost` (no dot), `git@host` (an SSH remote) and `icon@2x.png` are not
     addresses.
   - phone: Chinese mobiles (`1[3-9]` + 9 digits, optionally `+86`/`0086`/`86` which is kept),
     E.164 (`+` and 8 to 15 digits, spaces, dashes, one group in parentheses) and North
     American (`(415) 555-2671`, `415-555-2671`, `415.555.2671`). L1 keeps the first 3 digits
     (when there are 10 or more) and the last 4, L2 the last 4. Digits are starred in place and
     separators stay, except that the kept last 4 follow the stars directly:
     `+44 20 7946 0958` -> `+44 2* ****0958`. An 11-digit number followed by a unit (`bytes`,
     `KB`, `ms`...) is a count.
   - national IDs: a Chinese resident ID only when its ISO 7064 MOD 11-2 check digit is right;
     an SSN only as `AAA-GG-SSSS` outside area 000, 666, 9xx, group 00 and serial 0000; a NINO
     without the prefixes never issued (D F I Q U V first, D F I O Q U V second, BG GB KN NK NT
     TN ZZ). SSN and NINO keep their last 4 at L1 and L2, the conventional minimum
     (`AB 12 34 56 C` -> `** ** *456C`).

Numbers never match inside a longer run of letters or digits or next to `.`, so versions,
dates, IPv4 addresses, UUIDs, digests, epoch timestamps and ports stay. Masks never match again
(`scrub(scrub(x)) == scrub(x)`): no pattern starts right after a mark or `*`, nor ends right
before one.
"""

from __future__ import annotations

import base64
import copy
import json
import re
import shlex
from collections.abc import Callable, Mapping
from enum import StrEnum
from urllib.parse import quote, quote_plus

# A base64 fragment shorter than this could match ordinary text by chance.
_MIN_B64_CORE = 8


class MaskLevel(StrEnum):
    """How much personal data pattern masking keeps; secret-like text is masked at every level."""

    L1 = "L1"
    L2 = "L2"
    L3 = "L3"
    OFF = "off"


def _masked(kind: str) -> str:
    return f"[masked:{kind}]"


_TOKEN = _masked("token")
_CREDENTIALS = _masked("credentials")
_API_KEY = _masked("api-key")
_JWT = _masked("jwt")
_SECRET = _masked("secret")
_PRIVATE_KEY = _masked("private-key")
_EMAIL = "[email]"
_PHONE = "[phone]"
_NATIONAL_ID = "[national-id]"
_HIDDEN = "***"
_MARKS = (
    _TOKEN,
    _CREDENTIALS,
    _API_KEY,
    _JWT,
    _SECRET,
    _PRIVATE_KEY,
    _EMAIL,
    _PHONE,
    _NATIONAL_ID,
)


def _not_after_a_mark() -> str:
    """Lookbehinds refusing a match right after one of our marks (one per mark length)."""
    by_length: dict[int, list[str]] = {}
    for mark in _MARKS:
        by_length.setdefault(len(mark), []).append(re.escape(mark))
    checks = "".join(f"(?<!{'|'.join(marks)})" for marks in by_length.values())
    # Only a `]` can end a mark, so most positions skip the per-mark checks.
    return rf"(?:(?<!\])|{checks})"


# Nor does a match end right before one of our marks or a `*`: a mask starting with `[`, or
# starred after the characters it keeps, where the text had a letter, digit or dash would let
# the match before it appear the next time round.
_OUR_MARK = r"\[(?:masked:|email\]|phone\]|national-id\])"
_NO_MARK_AHEAD = rf"(?!\*|{_OUR_MARK})"

# A value already replaced by a mark (ours or the secret pass's) is left as it is.
_MARK_IN_VALUE = r"\[(?:secret|masked):[^\[\]\s]*\]|\[redacted\]|\u2588{3}"
_ALREADY_MASKED = re.compile(rf"(?:{_MARK_IN_VALUE}|\*)+")

# A number starts after no word, `.`, `+` or `word-`, and ends before no word, `+`, `.x` or `-x`,
# so that it never matches inside versions, dates, UUIDs, digests or longer digit runs.
_NUM_L = r"(?<![\w.+])(?<![\w\]]-)"
_NUM_R = r"(?![\w+]|[.\-]\w)" + _NO_MARK_AHEAD


def _ends_with_a_secret_name() -> str:
    """Lookbehinds accepting a key that ends like api_key, token, password and the like."""
    names = ["token", "secret", "password", "passphrase", "passwd", "pwd"]
    names += [f"{w}{sep}key" for w in ("api", "access", "secret", "private") for sep in "_.-"]
    names += [f"{w}key" for w in ("api", "access", "secret", "private")]
    by_length: dict[int, list[str]] = {}
    for name in names:
        by_length.setdefault(len(name), []).append(re.escape(name))
    return "(?i:" + "|".join(f"(?<={'|'.join(group)})" for group in by_length.values()) + ")"


_PRIVATE_KEY_RE = r"""
    -----BEGIN[ ](?:[A-Z0-9]+[ ])*PRIVATE[ ]KEY(?:[ ]BLOCK)?-----
    (?s:.*?-----END[ ](?:[A-Z0-9]+[ ])*PRIVATE[ ]KEY(?:[ ]BLOCK)?-----|.*)
"""
_URL_PW_PART = rf"[^\s/?\#\[@]*+(?:(?!{_OUR_MARK})\[[^\s/?\#\[@]*+)*+"
_ALTERNATIVES = {
    "auth": rf"""
        (?P<auth_pre>(?i:(?:proxy-)?authorization)["']?[ \t]*[:=][ \t]*["']?
            (?P<auth_scheme>(?i:bearer|basic|token))[ \t]+)
        (?P<auth_val>(?:[\w.~+/=\-]++|{_MARK_IN_VALUE})++)
    """,
    "bearer": r"""
        (?P<bearer_pre>(?i:bearer)[ \t]+)
        (?P<bearer_val>(?=[\w.~+/=\-]*\d)[\w.~+/=\-]{8,})
    """,
    # The password runs to the last `@` before the path, and not across a mark: in place of a
    # phone number with spaces, one would let the password reach an `@` further on.
    "url": rf"""
        (?<![\w+.\-])
        (?P<url_pre>[A-Za-z][A-Za-z0-9+.\-]*+://(?:[^\s:/@?\#\[\]]++|\[secret:[^\[\]\s]*\])*+:)
        (?P<url_pw>(?!@)(?:{_URL_PW_PART}@)*{_URL_PW_PART})@
    """,
    "kv": r"""
        (?<![\w.\-\[])  # `[secret:NAME]` is a mark, not a key
        (?!(?:OLD)?PWD["']?[ \t]*(?:=>|[:=]))
        (?P<kv_pre>[\w.\-]++(?=["']?[ \t]*(?:=>|[:=]))"""
    + _ends_with_a_secret_name()
    + r"""["']?[ \t]*(?:=>|[:=])[ \t]*)
        (?:"(?P<kv_dq>(?!")[^"\\\n]*+(?:\\.[^"\\\n]*+)*+)"
          |'(?P<kv_sq>(?!')[^'\\\n]*+(?:\\.[^'\\\n]*+)*+)'
          |(?!-----BEGIN|\[masked:private-key\])  # a private key's own pattern takes it
           (?P<kv_bare>(?:(?i:bearer|basic)[ \t]+)?[^\s"'&,;]+))
    """,
    "apikey": r"""
        (?<![\w.\-])
        (?:(?:sk|rk)_(?:live|test)_[0-9A-Za-z]{16,}
          |sk-(?=[\w\-]*\d)[\w\-]{20,}
          |gh[pousr]_[0-9A-Za-z]{36,}
          |github_pat_\w{22,}
          |xox[abprs]-[0-9A-Za-z\-]{10,}
          |(?:AKIA|ASIA)[0-9A-Z]{16}
          |AIza[\w\-]{35})
        (?![\w\-])
    """
    + _NO_MARK_AHEAD,
    "jwt": r"(?<![\w.\-])eyJ[\w\-]+\.eyJ[\w\-]+\.[\w\-]*(?![\w\-])" + _NO_MARK_AHEAD,
    "email": r"""
        (?<![\w.%+\-])(?!git@)
        (?P<email_local>[\w%+\-][\w.%+\-]*+)
        @(?![1-9]x\.)(?P<email_domain>  # not a retina image, icon@2x.png
            (?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63})
        (?![\w\-]|\.\w)
    """
    + _NO_MARK_AHEAD,
    # The number patterns below get their left boundary (_NUM_L) once, in _combined.
    "cn_id": r"[1-9]\d{5}(?:18|19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\d{3}[\dXx]"
    + _NUM_R,
    "ssn": r"(?!000|666|9)\d{3}-(?!00)\d{2}-(?!0000)\d{4}" + _NUM_R,
    "nino": r"""
        (?<![\w.\-])(?!BG|GB|KN|NK|NT|TN|ZZ)
        [A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z][ ]?\d{2}[ ]?\d{2}[ ]?\d{2}[ ]?[A-D]
        (?![\w\-]|\.\w)
    """
    + _NO_MARK_AHEAD,
    # A byte count or duration of 11 digits is not a phone number.
    "cn_mobile": r"""(?P<cn_cc>(?:\+|00)?86[ \-]?)?1[3-9]\d[ \-]?\d{4}[ \-]?\d{4}"""
    + _NUM_R
    + r"(?![ ]?(?:bytes?|[kKMGTP]?i?B|ms|us|ns|secs?|seconds?)\b)",
    # Parentheses only right after the country code: +1 (415) 555-2671, +44 (0)20 7946 0958.
    "e164": r"\+(?!\d{4}-\d\d-\d\d)(?=(?:[ \-()]*\d){8})"
    r"[1-9]\d{0,2}(?:[ \-]?\(\d{1,4}\))?(?:[ \-]?\d){4,14}" + _NUM_R,
    "na_phone": r"(?:\([2-9]\d{2}\)[ ]?|[2-9]\d{2}[\-.])[2-9]\d{2}[\-.]\d{4}" + _NUM_R,
}


def _combined() -> re.Pattern[str]:
    """One regex for all patterns, so that masking is a single pass over the text."""

    def either(*names: str) -> str:
        return "|".join(f"(?P<{name}>{_ALTERNATIVES[name]})" for name in names)

    # Most words of ordinary text are letters followed by a space: only these three patterns
    # can start such a word, the others are skipped by one look at where the letters end.
    plain_word = rf"(?=[A-Zbgrsx])(?:{either('bearer', 'nino', 'apikey')})"
    other = rf"""(?=[A-Za-z_]*+(?:[0-9@:=."'%+(\-]|[ \t]*+[:=]))(?:
        {either("email")}
        |(?=[0-9+(]){_NUM_L}(?:{either("cn_id", "ssn", "cn_mobile", "e164", "na_phone")})
        |{either("auth", "url", "kv", "jwt")})"""
    # A private key may follow anything; every other pattern starts at a word boundary and
    # never right after a mark, or masking the text again would find new matches.
    return re.compile(
        rf"(?P<private_key>{_PRIVATE_KEY_RE})"
        rf"|(?<![\w*.]){_not_after_a_mark()}(?:{plain_word}|{other})",
        re.ASCII | re.VERBOSE,
    )


_PATTERN = _combined()

_SECOND_LEVEL = frozenset({"ac", "co", "com", "edu", "gov", "ne", "net", "or", "org"})
_CN_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CN_CHECK = "10X98765432"


def _replace_group(m: re.Match[str], group: str, mark: str) -> str | None:
    """The match with one group's text replaced by `mark`, or None if it is already masked."""
    if _ALREADY_MASKED.fullmatch(m[group]):
        return None
    text = m.string
    return text[m.start() : m.start(group)] + mark + text[m.end(group) : m.end()]


def _auth(m: re.Match[str], _level: MaskLevel) -> str | None:
    mark = _CREDENTIALS if m["auth_scheme"].lower() == "basic" else _TOKEN
    return _replace_group(m, "auth_val", mark)


def _kv(m: re.Match[str], _level: MaskLevel) -> str | None:
    group = next(g for g in ("kv_dq", "kv_sq", "kv_bare") if m[g] is not None)
    return _replace_group(m, group, _SECRET)


def _email(m: re.Match[str], level: MaskLevel) -> str:
    if level is MaskLevel.L3:
        return _EMAIL
    local, labels = m["email_local"], m["email_domain"].split(".")
    second_level = len(labels) > 2 and len(labels[-1]) == 2 and labels[-2].lower() in _SECOND_LEVEL
    domain = ".".join(labels[-3:] if second_level else labels[-2:])
    kept = local[: min(3, len(local) - 1)] if level is MaskLevel.L1 else ""
    return f"{kept}{_HIDDEN}@{_HIDDEN}{domain}"


def _phone(text: str, level: MaskLevel) -> str:
    """A phone number with its middle digits starred, keeping what `level` allows."""
    if level is MaskLevel.L3:
        return _PHONE
    total = sum(c.isdigit() for c in text)
    return _star(text, head=3 if level is MaskLevel.L1 and total >= 10 else 0, tail=4)


def _star(text: str, head: int, tail: int, kept: Callable[[str], bool] = str.isdigit) -> str:
    """`text` with the `kept` characters starred but the first `head` and last `tail`.

    Separators stay, so that masking never joins what spaces kept apart, except right before
    the tail: written together right after the stars, nothing can start at it the next time.
    """
    positions = [i for i, c in enumerate(text) if kept(c)]
    kept_head, tail_at = set(positions[:head]), positions[-tail]
    body = "".join(
        "*" if kept(c) and i not in kept_head else c for i, c in enumerate(text[:tail_at])
    )
    kept_tail = "".join(c for c in text[tail_at:] if kept(c))
    return body.rstrip(" -.") + kept_tail + text[positions[-1] + 1 :]


def _cn_mobile(m: re.Match[str], level: MaskLevel) -> str:
    prefix = m["cn_cc"] or ""
    if level is MaskLevel.L3:
        return _PHONE
    return prefix + _phone(m[0][len(prefix) :], level)


def _e164(m: re.Match[str], level: MaskLevel) -> str | None:
    return _phone(m[0], level) if sum(c.isdigit() for c in m[0]) <= 15 else None


def _cn_id(m: re.Match[str], level: MaskLevel) -> str | None:
    value = m[0].upper()
    total = sum(int(c) * w for c, w in zip(value[:17], _CN_WEIGHTS, strict=True))
    if _CN_CHECK[total % 11] != value[17]:
        return None
    if level is MaskLevel.L3:
        return _NATIONAL_ID
    return (value[:3] + "*" * 11 if level is MaskLevel.L1 else "*" * 14) + value[-4:]


def _ssn(m: re.Match[str], level: MaskLevel) -> str:
    return _NATIONAL_ID if level is MaskLevel.L3 else "***-**-" + m[0][-4:]


def _nino(m: re.Match[str], level: MaskLevel) -> str:
    if level is MaskLevel.L3:
        return _NATIONAL_ID
    return _star(m[0], head=0, tail=4, kept=str.isalnum)


_Handler = Callable[[re.Match[str], MaskLevel], str | None]
_HANDLERS: dict[str, _Handler] = {
    "private_key": lambda m, _: _PRIVATE_KEY,
    "auth": _auth,
    "bearer": lambda m, _: _replace_group(m, "bearer_val", _TOKEN),
    "url": lambda m, _: _replace_group(m, "url_pw", _HIDDEN),
    "kv": _kv,
    "apikey": lambda m, _: _API_KEY,
    "jwt": lambda m, _: _JWT,
    "email": _email,
    "cn_id": _cn_id,
    "ssn": _ssn,
    "nino": _nino,
    "cn_mobile": _cn_mobile,
    "e164": _e164,
    "na_phone": lambda m, level: _phone(m[0], level),
}


def _mask(text: str, level: MaskLevel) -> tuple[str, bool]:
    """Pattern masking at `level` (not OFF), and whether anything was replaced."""
    replaced = 0

    def replace(m: re.Match[str]) -> str:
        nonlocal replaced
        assert m.lastgroup is not None  # every alternative is a named group
        result = _HANDLERS[m.lastgroup](m, level)
        if result is None:
            return m[0]
        replaced += 1
        return result

    result = _PATTERN.sub(replace, text)
    return result, replaced > 0


def mask(text: str, level: MaskLevel | str = MaskLevel.L1) -> tuple[str, bool]:
    """Pattern masking only (no secret values), and whether anything was replaced."""
    level = MaskLevel(level)
    if level is MaskLevel.OFF:
        return text, False
    return _mask(text, level)


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


def _forms(value: str) -> set[str]:
    """How `value` reads when printed raw, JSON-escaped, shell-quoted, URL-encoded or in base64."""
    forms = {value, quote(value, safe=""), quote_plus(value), shlex.quote(value)}
    forms.add(value.replace("'", "'\"'\"'"))  # inside single quotes, as shlex.quote writes it
    for ascii_only in (True, False):
        escaped = json.dumps(value, ensure_ascii=ascii_only)[1:-1]
        forms |= {escaped, escaped.replace("/", "\\/")}  # some encoders escape `/` too
    return forms | _b64_cores(value.encode())


class Redactor:
    """Replaces secret values (and encodings of them) with `[secret:NAME]`, then masks patterns."""

    __slots__ = (
        "_by_first_byte",
        "_byte_marks",
        "_byte_pattern",
        "_level",
        "_longest",
        "_marks",
        "_pattern",
    )

    def __init__(
        self, secrets: Mapping[str, str] | None = None, *, level: MaskLevel | str = MaskLevel.L1
    ) -> None:
        self._level = MaskLevel(level)
        forms: dict[str, str] = {}
        for name, value in (secrets or {}).items():
            if not value:
                continue
            own = _forms(value)
            # The mark must not itself contain a form, or scrubbing would put it back.
            mark = next(
                m
                for m in (f"[secret:{name}]", "[redacted]", "\u2588" * 3)
                if not any(form in m for form in own)
            )
            for form in own:
                forms.setdefault(form, mark)
        # Longest first, so a value is replaced whole before any shorter value inside it.
        ordered = sorted(forms, key=len, reverse=True)
        self._marks = forms
        self._pattern = re.compile("|".join(map(re.escape, ordered))) if ordered else None
        # The same forms as UTF-8, compiled on first use: most redactors never see raw bytes.
        self._byte_marks = {form.encode(): mark.encode() for form, mark in forms.items()}
        self._longest = max(map(len, self._byte_marks), default=0)
        self._byte_pattern: re.Pattern[bytes] | None = None
        self._by_first_byte: dict[int, tuple[bytes, ...]] | None = None

    @property
    def level(self) -> MaskLevel:
        """The pattern masking level."""
        return self._level

    @property
    def longest_form(self) -> int:
        """UTF-8 bytes of the longest form of a secret (0 without secrets): how far a secret
        that a cut splits can reach past the cut."""
        return self._longest

    def secret_spans(self, data: bytes) -> list[tuple[int, int, bytes]]:
        """Where the secret pass of `scrub` would replace a form in UTF-8 `data`: (start, end,
        mark), in order; matching bytes keeps offsets exact where the text would be cut."""
        if not self._byte_marks:
            return []
        if self._byte_pattern is None:
            ordered = sorted(self._byte_marks, key=len, reverse=True)
            self._byte_pattern = re.compile(b"|".join(map(re.escape, ordered)))
        marks = self._byte_marks
        return [(m.start(), m.end(), marks[m[0]]) for m in self._byte_pattern.finditer(data)]

    def unfinished_at(self, data: bytes | bytearray) -> int:
        """Where the earliest end of `data` begins that more bytes could make a secret form
        (a form's first bytes, or a form a longer one extends); `len(data)` when none does.

        What a stream published piece by piece holds back until the next piece or its end.
        """
        if not self._byte_marks:
            return len(data)
        if self._by_first_byte is None:
            grouped: dict[int, list[bytes]] = {}
            for form in self._byte_marks:
                grouped.setdefault(form[0], []).append(form)
            self._by_first_byte = {k: tuple(v) for k, v in grouped.items()}
        starts = self._by_first_byte
        size = len(data)
        for at in range(max(size - self.longest_form + 1, 0), size):
            forms = starts.get(data[at])
            if forms is None:
                continue
            rest = data[at:]
            if any(len(form) > len(rest) and form.startswith(rest) for form in forms):
                return at
        return size

    def with_level(self, level: MaskLevel | str) -> Redactor:
        """The same secrets at another level, sharing the compiled secret pattern."""
        level = MaskLevel(level)
        if level is self._level:
            return self
        other = copy.copy(self)
        other._level = level
        return other

    def _scrub_secrets(self, text: str) -> tuple[str, bool]:
        if self._pattern is None:
            return text, False
        result, count = self._pattern.subn(lambda m: self._marks[m.group(0)], text)
        return result, count > 0

    def scrub(self, text: str | None) -> tuple[str | None, bool]:
        """The text without secrets or masked patterns, and whether anything was replaced."""
        if text is None:
            return None, False
        result, changed = self._scrub_secrets(text)
        if self._level is MaskLevel.OFF:
            return result, changed
        result, masked = _mask(result, self._level)
        if masked and self._pattern is not None:
            # A mask keeps text on both sides of what it replaced, and joined up with its own
            # characters that could spell a secret value again.
            result, _ = self._scrub_secrets(result)
            # A secret inside a mark's own text (say "masked") can make the two passes undo
            # each other; the text is then what it was, and nothing counts as replaced.
            return result, result != text
        return result, changed or masked

    def scrub_value(self, value: object) -> tuple[object, bool]:
        """`scrub` applied to every string in nested dicts (keys too), lists and tuples."""
        if isinstance(value, str):
            scrubbed, changed = self.scrub(value)
            return (scrubbed, True) if changed else (value, False)
        if isinstance(value, dict):
            return self._scrub_dict(value)
        if isinstance(value, list | tuple):
            items, changed = [], False
            for item in value:
                new, item_changed = self.scrub_value(item)
                items.append(new)
                changed = changed or item_changed
            if not changed:
                return value, False
            if isinstance(value, list):
                return items, True
            make = getattr(type(value), "_make", None)  # a namedtuple keeps its type
            return (make(items) if callable(make) else tuple(items)), True
        return value, False

    def _scrub_dict(self, value: dict[object, object]) -> tuple[object, bool]:
        out: dict[object, object] = {}
        changed = False
        for key, item in value.items():
            new_key, key_changed = self.scrub_value(key) if isinstance(key, str) else (key, False)
            if isinstance(new_key, str) and new_key in out:
                # Two keys masked alike would otherwise lose one of the values.
                n = 2
                while f"{new_key}#{n}" in out:
                    n += 1
                new_key, key_changed = f"{new_key}#{n}", True
            new_item, item_changed = self.scrub_value(item)
            out[new_key] = new_item
            changed = changed or key_changed or item_changed
        return (out, True) if changed else (value, False)


# No secrets, default level: for text that has no command behind it.
PATTERNS_ONLY = Redactor()

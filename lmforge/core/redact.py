"""Credentials out of everything the project prints, logs or stores: the password of a URL's
user-info (`http://user:secret@host`) and token-like query parameters (`?token=...`).

One function for every message that may carry a URI (MLflow, Prefect, S3, DVC remotes).
"""

from __future__ import annotations

import re

MASK = "***"
# scheme://user:password@  or  scheme://token@ (a bare user-info is often a token, e.g. GitHub's)
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/\s@?#'\"<>]+)@")
# query/fragment parameters whose value is a secret (AWS presigned URLs, OAuth, API keys)
_SECRET_PARAM = re.compile(
    r"(?P<key>[?&;#](?:[\w.\-]*(?:token|secret|password|passwd|pwd|api[_\-]?key|apikey|access[_\-]?key|"
    r"signature|sig|credential|auth)[\w.\-]*))=(?P<value>[^&;#\s'\"<>]*)",
    re.IGNORECASE,
)


def _mask_userinfo(match: re.Match[str]) -> str:
    user, sep, _ = match.group("userinfo").partition(":")
    return f"{match.group('scheme')}{user}:{MASK}@" if sep else f"{match.group('scheme')}{MASK}@"


def redact(text: str) -> str:
    """`text` with every URL credential replaced by ***; the rest (host, port, path) kept."""
    if not text:
        return text
    text = _USERINFO.sub(_mask_userinfo, text)
    return _SECRET_PARAM.sub(lambda m: f"{m.group('key')}={MASK}", text)

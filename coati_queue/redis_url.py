"""Redis URL helpers that never leak the password."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def mask_redis_url(url: str | None) -> str:
    """``redis://user:secret@host:6379/0`` -> ``redis://user:***@host:6379/0``."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable Redis URL>"
    if parts.password is None and "@" not in parts.netloc:
        return url
    userinfo, _, hostinfo = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
    masked = f"{user}:***@{hostinfo}" if (user or parts.password) else f"***@{hostinfo}"
    return urlunsplit((parts.scheme, masked, parts.path, parts.query, parts.fragment))


def scrub(text: str, url: str | None) -> str:
    """Remove the password of ``url`` from any message (exceptions can echo it)."""
    if not url or not text:
        return text
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    text = text.replace(url, mask_redis_url(url))
    return text.replace(password, "***") if password else text

"""Redis URL helpers that never leak the password."""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlsplit, urlunsplit

#: redis-py also reads the password from the query string: ``?password=secret``.
QUERY_SECRETS = ("password",)


def _query_secrets(query: str) -> list[str]:
    return [value for key, value in parse_qsl(query, keep_blank_values=True)
            if key.lower() in QUERY_SECRETS and value]


def _masked_query(query: str) -> str:
    parts = []
    for pair in query.split("&") if query else []:
        key = unquote(pair.partition("=")[0])
        parts.append(f"{pair.partition('=')[0]}=***" if key.lower() in QUERY_SECRETS else pair)
    return "&".join(parts)


def mask_redis_url(url: str | None) -> str:
    """``redis://u:secret@host/0?password=x`` -> ``redis://u:***@host/0?password=***``."""
    if not url:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable Redis URL>"
    netloc = parts.netloc
    if parts.password is not None or "@" in netloc:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
        netloc = f"{user}:***@{hostinfo}" if (user or parts.password) else f"***@{hostinfo}"
    return urlunsplit((parts.scheme, netloc, parts.path, _masked_query(parts.query),
                       parts.fragment))


def error_text(exc: BaseException, url: str | None) -> str:
    """An exception as a user may read it: its message (or type), passwords removed."""
    return scrub(str(exc) or type(exc).__name__, url)


def scrub(text: str, url: str | None) -> str:
    """Remove the passwords of ``url`` from any message (exceptions can echo them)."""
    if not url or not text:
        return text
    try:
        parts = urlsplit(url)
        secrets = [parts.password] if parts.password else []
        secrets += _query_secrets(parts.query)
    except ValueError:
        secrets = []
    text = text.replace(url, mask_redis_url(url))
    for secret in secrets:
        text = text.replace(secret, "***")
    return text

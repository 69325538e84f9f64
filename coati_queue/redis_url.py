"""Redis URL helpers that never leak the password."""

from __future__ import annotations

import re
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


def broker_errors() -> tuple[type[BaseException], ...]:
    """What an unreachable or misconfigured broker raises (redis' errors only when installed).

    Catch these, not ``Exception``, where a broker that does not answer must become a
    message: a bug elsewhere still raises.
    """
    from django.core.exceptions import ImproperlyConfigured

    from .backends import library_errors
    from .core.exceptions import CoatiQueueError

    return (CoatiQueueError, ImproperlyConfigured, OSError, *library_errors())


def masked_broker_error(exc: BaseException, url: str | None = None) -> str:
    """A caught broker error as one line a user or a log may show: its message (or type),
    the passwords of ``url`` (default: the ``REDIS_URL`` setting) removed."""
    if url is None:
        from .conf import get_settings

        url = get_settings().REDIS_URL
    return " ".join(error_text(exc, url).split())


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


class RedisURL(str):
    """A Redis URL that works wherever a ``str`` does, but whose ``repr`` masks the password.

    Django's DEBUG error page prints every local variable of every frame with
    ``repr`` (``sensitive_variables`` is ignored while ``DEBUG`` is on), so a
    plain string holding the URL would show the password; this one shows
    ``'redis://:***@host/0'``. ``str(url)`` and every string operation still see
    the real URL (redis-py needs it).
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(mask_redis_url(str(self)))


def secret_url(url: str | None) -> RedisURL | None:
    """``url`` as a :class:`RedisURL` (None and "" stay None)."""
    if not url:
        return None
    return url if isinstance(url, RedisURL) else RedisURL(url)


#: Setting names whose values Django's error pages and error e-mails replace with stars,
#: on top of Django's own API|AUTH|TOKEN|KEY|SECRET|PASS|SIGNATURE|HTTP_COOKIE.
HIDDEN_SETTING_NAMES = ("REDIS_URL",)


def hidden_settings_pattern(base: re.Pattern[str]) -> re.Pattern[str]:
    """Django's ``hidden_settings`` pattern extended with :data:`HIDDEN_SETTING_NAMES`."""
    extra = [name for name in HIDDEN_SETTING_NAMES if not base.search(name)]
    if not extra:
        return base
    return re.compile("|".join([base.pattern, *extra]), base.flags)


def hide_redis_url_on_error_pages() -> None:
    """Make Django's error pages hide ``REDIS_URL`` with no setting to add.

    Django's ``SafeExceptionReporterFilter`` replaces settings (and keys of
    dict settings such as ``COATI_QUEUE``, and ``request.META`` entries such as
    an environment variable under ``runserver``) whose name matches its
    ``hidden_settings``; ``REDIS_URL`` does not match it, so its password would
    show. This extends the pattern of the filter class (and so of every
    subclass that does not replace the pattern). Idempotent. A project whose own
    ``DEFAULT_EXCEPTION_REPORTER_FILTER`` sets its own ``hidden_settings`` wraps it:
    ``hidden_settings = hidden_settings_pattern(re.compile("...", re.I))``.
    """
    from django.views.debug import SafeExceptionReporterFilter

    current = SafeExceptionReporterFilter.hidden_settings
    extended = hidden_settings_pattern(current)
    if extended is not current:
        SafeExceptionReporterFilter.hidden_settings = extended


"""Drivers: the only modules that import a queue library, loaded lazily."""

from __future__ import annotations

import importlib.util


def library_errors() -> tuple[type[BaseException], ...]:
    """Base exceptions of the installed queue libraries that reach callers unwrapped
    (redis-py's ``RedisError``, from Dramatiq's broker); empty without redis."""
    if importlib.util.find_spec("redis") is None:
        return ()
    import redis

    return (redis.RedisError,)

"""The JSON job envelope: what travels on every backend's wire.

A job is plain JSON (never pickle), so a message written by one backend's
client can be read, inspected and dead-lettered by anyone.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from .exceptions import InvalidJob

ENVELOPE_VERSION = 1


class NotJSONSerializable(TypeError):
    """An argument or result that is not plain JSON; retrying cannot fix it."""


def ensure_json(value: Any, where: str) -> None:
    """Raise ``NotJSONSerializable`` naming ``where`` when ``value`` is not plain JSON."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise NotJSONSerializable(
            f"{where} is not JSON-serializable ({type(value).__name__}: {exc}). "
            "coati_queue sends only JSON: pass ids, strings, numbers, lists and dicts, "
            "and load objects inside the task."
        ) from None


def ensure_json_arguments(task_name: str, args: tuple | list, kwargs: dict) -> None:
    for index, value in enumerate(args):
        ensure_json(value, f"Positional argument {index} of task {task_name!r}")
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise TypeError(f"Keyword argument names of task {task_name!r} must be strings.")
        ensure_json(value, f"Argument {key!r} of task {task_name!r}")


def new_job_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class Job:
    """One task invocation; ``attempt`` is 1 for the first delivery."""

    task: str
    args: list = field(default_factory=list)
    kwargs: dict = field(default_factory=dict)
    queue: str = "default"
    id: str = field(default_factory=new_job_id)
    attempt: int = 1
    max_retries: int = 0
    min_backoff: int = 15_000
    max_backoff: int = 3_600_000
    time_limit: int | None = None
    enqueued_at: float = field(default_factory=time.time)
    eta: float | None = None
    batch_id: int | None = None
    v: int = ENVELOPE_VERSION

    def to_dict(self) -> dict[str, Any]:
        # Shallow on purpose: dataclasses.asdict deep-copies args on every send.
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def encode(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def decode(cls, data: str | bytes | dict) -> "Job":
        """Parse a message; ``InvalidJob`` says what is wrong with it."""
        if isinstance(data, (bytes, bytearray)):
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidJob(f"message is not UTF-8 text: {exc}") from None
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except ValueError as exc:
                raise InvalidJob(f"message is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InvalidJob(f"message must be a JSON object, got {type(data).__name__}")
        missing = [key for key in ("task", "id") if not data.get(key)]
        if missing:
            raise InvalidJob(f"message lacks required field(s): {', '.join(missing)}")
        known = cls.__dataclass_fields__
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise InvalidJob(f"message has unknown field(s): {', '.join(unknown)}")
        if not isinstance(data.get("args", []), list) or not isinstance(data.get("kwargs", {}),
                                                                          dict):
            raise InvalidJob("message args must be a list and kwargs an object")
        try:
            return cls(**data)
        except TypeError as exc:
            raise InvalidJob(f"message fields are malformed: {exc}") from None

    @property
    def retries_left(self) -> int:
        return max(self.max_retries - (self.attempt - 1), 0)

    def next_attempt(self) -> "Job":
        return replace(self, attempt=self.attempt + 1)

    def backoff_ms(self, rng: random.Random | None = None) -> int:
        """Exponential backoff with jitter, within [min_backoff, max_backoff].

        The n-th retry waits between half and all of ``min_backoff * 2**(n-1)``
        ("equal jitter"), so retries of many failed jobs spread out instead of
        arriving together.
        """
        ceiling = min(self.min_backoff * (2 ** (self.attempt - 1)), self.max_backoff)
        jittered = ceiling / 2 + (rng or random).uniform(0, ceiling / 2)
        return int(min(max(jittered, self.min_backoff), self.max_backoff))


def peek_job_fields(raw: Any) -> dict[str, Any]:
    """Best-effort id/task of an undecodable message, for its dead-letter record."""
    if isinstance(raw, (bytes, bytearray)):
        raw = raw.decode("utf-8", "replace")
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return {}
    if not isinstance(raw, dict):
        return {}
    return {key: raw[key] for key in ("id", "task", "queue") if isinstance(raw.get(key), str)}

"""The JSON job envelope: what travels on every backend's wire.

A job is plain JSON (never pickle), so a message written by one backend's
client can be read, inspected and dead-lettered by anyone.
"""

from __future__ import annotations

import json
import random
import re
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

from .exceptions import InvalidJob

ENVELOPE_VERSION = 1
#: Deepest nesting of lists/objects accepted in arguments; deeper JSON is refused at
#: send and dead-lettered in workers (it would exhaust the recursion limit later).
MAX_JSON_DEPTH = 64
#: Bounds of the envelope's numbers: anything outside is a forged or corrupt message.
MAX_ATTEMPTS = 1_000
MAX_BACKOFF_MS = 7 * 86_400_000
ID_PATTERN = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class NotJSONSerializable(TypeError):
    """An argument or result that is not plain JSON; retrying cannot fix it."""


def ensure_json(value: Any, where: str) -> int:
    """Raise ``NotJSONSerializable`` naming ``where`` unless ``value`` is plain JSON;
    returns the length of its encoding (the size check reuses the one dumps)."""
    try:
        return len(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise NotJSONSerializable(
            f"{where} is not JSON-serializable ({type(value).__name__}: {exc}). "
            "coati_queue sends only JSON: pass ids, strings, numbers, lists and dicts, "
            "and load objects inside the task."
        ) from None


def ensure_json_arguments(task_name: str, args: tuple[Any, ...] | list[Any],
                          kwargs: dict[str, Any], max_size: int | None = None) -> None:
    """Arguments must be plain JSON nested at most ``MAX_JSON_DEPTH`` deep and, with
    ``max_size``, encode to at most that many bytes in all (checked at send, so the
    caller gets the error rather than a worker's dead letter)."""
    if json_depth([list(args), kwargs]) > MAX_JSON_DEPTH + 1:
        raise ValueError(f"The arguments of task {task_name!r} nest deeper than "
                         f"{MAX_JSON_DEPTH} levels; pass flatter data.")
    size = 0
    for index, value in enumerate(args):
        size += ensure_json(value, f"Positional argument {index} of task {task_name!r}")
    for key, value in kwargs.items():
        if not isinstance(key, str):
            raise TypeError(f"Keyword argument names of task {task_name!r} must be strings.")
        size += len(key) + ensure_json(value, f"Argument {key!r} of task {task_name!r}")
    if max_size is not None and size > max_size:
        raise ValueError(f"The arguments of task {task_name!r} encode to {size:,} bytes, over "
                         f"the {max_size:,}-byte limit (COATI_QUEUE['MAX_MESSAGE_SIZE']). "
                         "Store large data in the database or a file and pass its id.")


def json_depth(value: Any, limit: int = MAX_JSON_DEPTH + 2) -> int:
    """Nesting depth of lists/dicts, counted without recursion and stopping at ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (list, dict)):
            deepest = max(deepest, depth)
            if deepest >= limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children
                         if isinstance(child, (list, dict)))
    return deepest


def new_job_id() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class Job:
    """One task invocation; ``attempt`` is 1 for the first delivery."""

    task: str
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str = "default"
    id: str = field(default_factory=new_job_id)
    attempt: int = 1
    max_retries: int = 0
    min_backoff: int = 15_000
    max_backoff: int = 3_600_000
    time_limit: int | None = None
    soft_time_limit: int | None = None
    enqueued_at: float = field(default_factory=time.time)
    eta: float | None = None
    batch_id: int | None = None
    # 1 for a message as first sent. Above 1 when this attempt may have been delivered
    # before: given back after its worker died, or re-sent from its record. Only such
    # deliveries pay for claiming the record before running (coati_queue.claims).
    delivery: int = 1
    v: int = ENVELOPE_VERSION

    def to_dict(self) -> dict[str, Any]:
        # Shallow on purpose: dataclasses.asdict deep-copies args on every send.
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def encode(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def decode(cls, data: str | bytes | dict[str, Any]) -> "Job":
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
            except RecursionError:
                raise InvalidJob("message JSON is nested too deeply to parse") from None
        if not isinstance(data, dict):
            raise InvalidJob(f"message must be a JSON object, got {type(data).__name__}")
        missing = [key for key in ("task", "id") if not data.get(key)]
        if missing:
            raise InvalidJob(f"message lacks required field(s): {', '.join(missing)}")
        known = cls.__dataclass_fields__
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise InvalidJob(f"message has unknown field(s): {', '.join(unknown)}")
        problems = _field_problems(data)
        if problems:
            raise InvalidJob("message field(s) out of range or of the wrong type: "
                             + "; ".join(problems))
        return cls(**data)

    @property
    def retries_left(self) -> int:
        return max(self.max_retries - (self.attempt - 1), 0)

    def next_attempt(self) -> "Job":
        return replace(self, attempt=self.attempt + 1, delivery=1)

    @property
    def redelivered(self) -> bool:
        """This attempt may have run (or be running) already: claim before running."""
        return self.delivery > 1

    def backoff_ms(self, rng: random.Random | None = None) -> int:
        """Exponential backoff with "equal jitter", at most ``max_backoff``.

        The n-th retry waits between half and all of
        ``min(min_backoff * 2**(n-1), max_backoff)``, uniformly: the first one
        between ``min_backoff / 2`` and ``min_backoff``. Every retry is jittered,
        the first included, so the retries of many jobs that failed together
        (a database restart) spread out instead of arriving together.
        """
        ceiling = min(self.min_backoff * (2 ** max(self.attempt - 1, 0)), self.max_backoff)
        return int(ceiling / 2 + (rng or random).uniform(0, ceiling / 2))


def _is_int(value: Any, low: int, high: int) -> bool:
    return type(value) is int and low <= value <= high


def _is_time(value: Any) -> bool:
    return type(value) in (int, float) and 0 <= value < 2 ** 34  # until the year 2514


#: Each envelope field's test and what it expects, built once (checked per message).
FIELD_CHECKS: dict[str, tuple[Any, str]] = {
    "task": (lambda v: isinstance(v, str) and 0 < len(v) <= 200, "a name of 1-200 chars"),
    "id": (lambda v: isinstance(v, str) and bool(ID_PATTERN.match(v)), "a lowercase UUID"),
    "args": (lambda v: isinstance(v, list), "a list"),
    "kwargs": (lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
               "an object"),
    "queue": (lambda v: isinstance(v, str) and 0 < len(v) <= 64, "a queue name"),
    "attempt": (lambda v: _is_int(v, 1, MAX_ATTEMPTS), f"1..{MAX_ATTEMPTS}"),
    "max_retries": (lambda v: _is_int(v, 0, MAX_ATTEMPTS), f"0..{MAX_ATTEMPTS}"),
    "min_backoff": (lambda v: _is_int(v, 0, MAX_BACKOFF_MS), f"0..{MAX_BACKOFF_MS} ms"),
    "max_backoff": (lambda v: _is_int(v, 0, MAX_BACKOFF_MS), f"0..{MAX_BACKOFF_MS} ms"),
    "time_limit": (lambda v: v is None or _is_int(v, 1, MAX_BACKOFF_MS),
                   f"null or 1..{MAX_BACKOFF_MS} ms"),
    "soft_time_limit": (lambda v: v is None or _is_int(v, 1, MAX_BACKOFF_MS),
                        f"null or 1..{MAX_BACKOFF_MS} ms"),
    "enqueued_at": (lambda v: _is_time(v), "a Unix time"),
    "eta": (lambda v: v is None or _is_time(v), "null or a Unix time"),
    "batch_id": (lambda v: v is None or _is_int(v, 1, 2 ** 63 - 1), "null or a positive id"),
    "delivery": (lambda v: _is_int(v, 1, 2 ** 31 - 1), "a positive whole number"),
    "v": (lambda v: v == ENVELOPE_VERSION, f"{ENVELOPE_VERSION}"),
}


def _field_problems(data: dict[str, Any]) -> list[str]:
    """What is wrong with a decoded envelope's fields; empty when it is valid.

    Every field is checked for type and range, so a forged message cannot reach
    the tracking writer with a value the database refuses (poisoning its buffer).
    """
    problems = [f"{name} must be {expected}, got {_short(data[name])}"
                for name, (valid, expected) in FIELD_CHECKS.items()
                if name in data and not valid(data[name])]
    if not problems and json_depth([data.get("args", []), data.get("kwargs", {})]) \
            > MAX_JSON_DEPTH + 1:
        problems.append(f"arguments nest deeper than {MAX_JSON_DEPTH} levels")
    return problems


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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

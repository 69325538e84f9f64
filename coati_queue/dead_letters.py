"""Dead letters: messages no worker could run, kept so a person can read, requeue or drop them.

Workers call :func:`record` for every message they cannot decode (it is the
last line of defence, so nothing about the payload can make it raise), and
:func:`collect_broker_dead_letters` for the messages the broker refused on its
own (Dramatiq's dead-letter set). :func:`requeue` sends a dead letter again as
a new task once its payload decodes, which is what the admin action runs.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from typing import Any, Iterable

from django.db import DatabaseError, transaction
from django.db.models import Count
from django.utils import timezone
from django.utils.translation import gettext

from .conf import get_settings
from .core.exceptions import InvalidJob, TaskNotRegistered
from .core.jobs import Job, new_job_id, peek_job_fields
from .core.tasks import registry
from .models import DeadLetter, PayrollBatch

logger = logging.getLogger("coati_queue.worker")

#: Sources the code writes; metrics always export these, even at zero.
KNOWN_SOURCES = ("worker", "huey-file", "dramatiq-dlq")
REASON_LIMIT = 4000
#: Model field lengths: a forged payload must not make the INSERT fail on PostgreSQL.
FIELD_LIMITS = {"backend": 16, "source": 32, "queue": 64, "task_name": 200, "task_id": 64,
                "seen_by": 128}


# -- recording --------------------------------------------------------------------------
def record(raw: Any, reason: str, *, backend: str, queue: str = "", source: str = "worker",
           seen_by: str = "", size: int | None = None) -> DeadLetter:
    """Store ``raw`` as a dead letter; never raises on bad input (database errors do).

    ``size`` is the full size in bytes when ``raw`` is already only the start of
    the message (a broker that sent just a prefix of a huge payload).
    """
    limit = get_settings().DEAD_LETTER_PAYLOAD_LIMIT
    text, full_size = _as_text(raw, limit)
    if size is not None:
        full_size = max(full_size, size)
    payload, clipped = _clip_utf8(text, limit)
    truncated = clipped or full_size > len(text.encode("utf-8", "surrogatepass"))
    peeked = _peek(raw, full_size)
    fields = {
        "backend": backend, "source": source, "seen_by": seen_by,
        "queue": queue or peeked.get("queue", ""),
        "task_name": peeked.get("task", ""), "task_id": peeked.get("id", ""),
    }
    fields = {name: _db_text(str(value))[:FIELD_LIMITS[name]] for name, value in fields.items()}
    return DeadLetter.objects.create(
        reason=_db_text(str(reason))[:REASON_LIMIT] or "unknown reason",
        payload=_db_text(payload), payload_size=full_size, truncated=truncated, **fields)


def _as_text(raw: Any, limit: int) -> tuple[str, int]:
    """(text to keep, at least ``limit`` bytes of it when there are; full size in bytes)."""
    if isinstance(raw, (bytes, bytearray, memoryview)):
        data = bytes(raw)
        # Cut before decoding: a 20 MB payload is never turned into a 80 MB string.
        return data[:limit + 4].decode("utf-8", "backslashreplace"), len(data)
    if isinstance(raw, str):
        return raw, len(raw.encode("utf-8", "surrogatepass"))
    try:
        text = json.dumps(raw, ensure_ascii=False, default=repr)
    except (RecursionError, ValueError, TypeError):
        text = f"<{type(raw).__name__} that cannot be shown>"
    return text, len(text.encode("utf-8", "surrogatepass"))


def _clip_utf8(text: str, limit: int) -> tuple[str, bool]:
    """At most ``limit`` bytes of UTF-8, never cutting a character; True when cut."""
    head = text[:limit + 1]  # a character is at least one byte
    data = head.encode("utf-8", "backslashreplace")  # lone surrogates become \udxxx
    if len(data) <= limit and len(head) == len(text):
        return data.decode("utf-8"), False
    return data[:limit].decode("utf-8", "ignore"), True


def _db_text(text: str) -> str:
    """Text every database stores: no NUL (PostgreSQL refuses it), no lone surrogate."""
    return text.replace("\x00", "\\x00").encode("utf-8", "backslashreplace").decode("utf-8")


def _peek(raw: Any, size: int) -> dict[str, str]:
    """Task name, id and queue when the payload is (or wraps) a JSON envelope; else {}."""
    if size > get_settings().MAX_MESSAGE_SIZE:
        return {}  # never parse what no worker would have accepted
    try:
        data = _parse(raw)
        return peek_job_fields(_unwrap(data)) if isinstance(data, dict) else {}
    except (RecursionError, ValueError, TypeError):
        return {}


def _parse(raw: Any) -> Any:
    if isinstance(raw, (bytes, bytearray, memoryview)):
        raw = bytes(raw).decode("utf-8", "replace")
    return json.loads(raw) if isinstance(raw, str) else raw


def _unwrap(data: dict[str, Any]) -> dict[str, Any]:
    """The coati envelope inside a Dramatiq message (``{"actor_name":..., "args": [job]}``)."""
    args = data.get("args")
    if ("actor_name" in data and isinstance(args, list) and len(args) == 1
            and isinstance(args[0], dict)):
        return args[0]
    return data


# -- broker dead-letter sets ------------------------------------------------------------
def collect_broker_dead_letters(driver: Any, *, seen_by: str = "") -> int:
    """Move what the broker dead-lettered on its own into ``DeadLetter`` rows.

    Called from the worker's maintenance loop: Dramatiq keeps its dead letters
    for 7 days in Redis, where nobody looks. Returns how many were recorded.
    """
    taken = driver.take_dead_letters()
    if not taken:
        return 0
    try:
        with transaction.atomic():
            for item in taken:
                record(item["payload"], item.get("reason") or "rejected by the broker",
                       backend=driver.name, queue=item.get("queue", ""),
                       source=item.get("source", f"{driver.name}-dlq"), seen_by=seen_by,
                       size=item.get("size"))
    except DatabaseError:
        # They are gone from the broker: the log is the only place left to find them.
        for item in taken:
            logger.error("Dead letter from %s queue %r lost (database error), starts: %r",
                         driver.name, item.get("queue", ""), _head(item["payload"]))
        raise
    logger.warning("Recorded %d dead letter(s) from %s's dead-letter set.", len(taken),
                   driver.name)
    return len(taken)


def _head(payload: Any, length: int = 2000) -> Any:
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload[:length])
    return str(payload)[:length]


# -- requeueing -------------------------------------------------------------------------
def decode_payload(letter: DeadLetter) -> Job:
    """The job a dead letter holds, or ``InvalidJob`` saying why it cannot be sent.

    A payload from Dramatiq's dead-letter set is a whole Dramatiq message; the
    job is its one argument.
    """
    if letter.truncated:
        raise InvalidJob(gettext("only the first %(kept)s of its %(size)s bytes were kept")
                         % {"kept": len(letter.payload.encode("utf-8")),
                            "size": letter.payload_size})
    try:
        data = json.loads(letter.payload)
    except RecursionError:
        raise InvalidJob("message JSON is nested too deeply to parse") from None
    except ValueError:
        data = letter.payload  # Job.decode says what is wrong with it
    return Job.decode(_unwrap(data) if isinstance(data, dict) else data)


def requeue(dead_letters: Iterable[DeadLetter]) -> tuple[list[str], dict[int, str]]:
    """Send again, as new tasks, the dead letters whose payload decodes to a registered task.

    Each one gets a fresh task id and attempt 1, so its tracking record is new;
    the letter keeps ``requeued_at``/``requeued_as`` and is never sent twice.
    Returns (new task ids, {dead letter id: why it was not sent}).
    """
    from .redis_url import broker_errors, masked_broker_error
    from .selection import get_queue_driver

    driver = get_queue_driver()
    sent: list[str] = []
    errors: dict[int, str] = {}
    for letter in dead_letters:
        if letter.requeued_at is not None:
            errors[letter.pk] = gettext("already requeued as task %(id)s") % {
                "id": letter.requeued_as}
            continue
        try:
            job = _fresh_job(decode_payload(letter), driver.settings)
        except InvalidJob as exc:
            errors[letter.pk] = str(exc)
            continue
        except TaskNotRegistered as exc:
            errors[letter.pk] = gettext("no task named %(name)s is registered") % {
                "name": exc.name}
            continue
        try:
            with transaction.atomic():
                claimed = DeadLetter.objects.filter(pk=letter.pk, requeued_at__isnull=True).update(
                    requeued_at=timezone.now(), requeued_as=job.id)
                if not claimed:  # another admin requeued it meanwhile
                    errors[letter.pk] = gettext("already requeued")
                    continue
                driver.dispatch([job], on_commit=False)
        except broker_errors() as exc:  # the rest would fail the same way
            errors[letter.pk] = gettext("the queue is unavailable: %(error)s") % {
                "error": masked_broker_error(exc, driver.settings.REDIS_URL)}
            break
        sent.append(job.id)
    return sent, errors


def _fresh_job(job: Job, settings: Any) -> Job:
    task = registry.get(job.task)  # TaskNotRegistered says which names exist
    queue = job.queue if job.queue in settings.QUEUES else (
        task.options.queue or settings.DEFAULT_QUEUE)
    batch_id = job.batch_id
    if batch_id is not None and not PayrollBatch.objects.filter(pk=batch_id).exists():
        batch_id = None  # the record's foreign key would refuse it
    return replace(job, id=new_job_id(), attempt=1, queue=queue, eta=None,
                   enqueued_at=time.time(), batch_id=batch_id)


# -- counts -----------------------------------------------------------------------------
def waiting_counts() -> dict[str, int]:
    """Dead letters not requeued yet, per source (one GROUP BY; every known source listed)."""
    counts = dict.fromkeys(KNOWN_SOURCES, 0)
    rows = (DeadLetter.objects.filter(requeued_at__isnull=True).order_by()
            .values_list("source").annotate(n=Count("id")))
    counts.update({source: n for source, n in rows})
    return counts

"""No split brain: jobs queued on the Huey fallback while Redis was down move to Redis.

With ``BACKEND = "auto"`` a process that starts while Redis does not answer
queues on Huey files. Once Redis is back and workers run on Dramatiq, nothing
would ever consume that directory; so every Dramatiq worker looks at the Huey
directories of its host (the same candidate chain ``auto`` would use) and moves
their jobs to Redis, one claimed file at a time (a crash mid-move leaves the file
reserved, and the reservation goes back to the directory: nothing lost).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import replace
from typing import Any

from .core.exceptions import InvalidJob
from .core.jobs import Job

logger = logging.getLogger("coati_queue.worker")

#: Far enough ahead to take every delayed job from the fallback's schedule.
SCHEDULE_HORIZON = datetime.datetime(9999, 1, 1)


def fallback_directories(settings: Any) -> list[str]:
    """The Huey candidates of this host that exist and are safe (none is created by
    looking): a directory another user could write to is never drained."""
    from .selection import directory_problem, huey_path_candidates

    usable = []
    for path, _label in huey_path_candidates(settings):
        if not os.path.isdir(path):
            continue
        problem = directory_problem(path, create=False)
        if problem is not None:
            logger.error("Not draining the Huey directory %s: %s", path, problem.reason)
            continue
        usable.append(path)
    return usable


def waiting_in_fallback(driver: Any) -> dict[str, int]:
    """``{directory: jobs}`` left on Huey files while this process runs on Dramatiq."""
    if driver.name != "dramatiq":
        return {}
    waiting = {}
    for path in fallback_directories(driver.settings):
        count = _fallback_driver(driver, path).huey.storage.queue_size()
        if count:
            waiting[path] = count
    return waiting


def fallback_job_ids(driver: Any) -> set[str]:
    """Ids of the jobs in this host's Huey directories (Dramatiq only; one listing each)."""
    if driver.name != "dramatiq":
        return set()
    return set().union(*(_fallback_driver(driver, path).huey.storage.present_job_ids()
                         for path in fallback_directories(driver.settings)))


def _fallback_driver(driver: Any, path: str) -> Any:
    from .backends.huey import HueyDriver

    from .selection import verify_huey_directory

    return HueyDriver(driver.settings, path=path, reason="fallback directory",
                      middleware=driver.middleware.middleware, verify_path=verify_huey_directory)


def drain_fallback_directories(driver: Any) -> int:
    """Move every job of this host's Huey directories to ``driver`` (Dramatiq only)."""
    if driver.name != "dramatiq":
        return 0
    moved = 0
    for path in fallback_directories(driver.settings):
        moved += _drain(driver, _fallback_driver(driver, path), path)
    return moved


def _drain(driver: Any, fallback: Any, path: str) -> int:
    storage = fallback.huey.storage
    if not storage.queue_size() and not storage.schedule_size():
        return 0
    moved = 0
    storage.read_schedule(SCHEDULE_HORIZON)  # every delayed file into the queue; eta kept
    try:
        while (data := storage.dequeue()) is not None:
            _move(driver, fallback, data)
            storage.ack()
            moved += 1
    finally:
        storage.release_reservations()
    if moved:
        logger.warning("Moved %d job(s) queued on the Huey fallback at %s to %s.", moved, path,
                       driver.describe())
    return moved


def _move(driver: Any, fallback: Any, data: bytes) -> None:
    message = fallback.huey.serializer.deserialize(data)
    envelope = message.args[0] if message.args else None
    try:
        job = Job.decode(envelope if isinstance(envelope, dict) else data)
    except InvalidJob as exc:
        driver.middleware.after("after_invalid_message", driver, data, exc)
        return
    # Marked as a possible redelivery (claimed before it runs): a reconciler on
    # another host may have re-sent it from its record while it waited here.
    driver.send([replace(job, delivery=job.delivery + 1)])  # eta kept: delayed stays delayed

"""Dramatiq + Redis: the production driver.

One generic actor per configured queue (``coati.<queue>``), each with the
queue's priority, so a busy worker takes ``high`` before ``default`` before
``low`` (a worker given ``--queues`` in another order re-ranks its own actors).
The actor hands the JSON envelope to the shared executor; Dramatiq's own
Retries middleware is left out because retries are decided by
``coati_queue.core.execution``, and its TimeLimit middleware because time
limits are enforced the same way on every backend (``coati_queue.time_limits``):
its watchdog only ran under Dramatiq's own CLI, and its 10-minute default
applied to tasks that asked for no limit.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any, Iterable

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import dq_name
from dramatiq.middleware import ShutdownNotifications

from ..core.exceptions import BackendUnavailable
from ..core.jobs import Job
from ..redis_url import error_text, mask_redis_url
from .base import QueueDriver
from .dramatiq_dead_letters import DeadLetteringRedisBroker
from .dramatiq_redelivery import heartbeat_and_give_back


NAMESPACE = "coati"
ACTOR_PREFIX = "coati."
FIRST_FETCH_WAIT = 2.0  # seconds a starting worker waits for its consumers' first fetch


def redis_message_id(job_id: str, attempt: int) -> str:
    """Each attempt its own id: a retry is enqueued before the attempt that failed is
    acked, and the ack deletes the body stored under the acked id."""
    return f"{job_id}.{attempt}"


class DramatiqDriver(QueueDriver):
    name = "dramatiq"

    def __init__(self, settings: Any, *, redis_url: str, reason: str = "", **kwargs: Any):
        super().__init__(settings, reason=reason, **kwargs)
        self.redis_url = redis_url
        self._broker: RedisBroker | None = None
        self._actors: dict[str, dramatiq.Actor] = {}
        self._lock = threading.Lock()

    # -- client -----------------------------------------------------------
    @property
    def broker(self) -> RedisBroker:
        """Built on first use, never at import."""
        if self._broker is None:
            with self._lock:
                if self._broker is None:
                    self._broker = self._build_broker()
        return self._broker

    def _build_broker(self) -> RedisBroker:
        broker = DeadLetteringRedisBroker(
            url=self.redis_url, namespace=NAMESPACE,
            heartbeat_timeout=int(self.settings.REDIS_HEARTBEAT_TIMEOUT * 1000),
            maintenance_chance=0,  # dead workers' messages: given back by maintain()
            middleware=[ShutdownNotifications()])
        for queue, priority in _priorities(self.settings.QUEUES).items():
            self._actors[queue] = dramatiq.actor(
                self._run_envelope, actor_name=f"{ACTOR_PREFIX}{queue}", queue_name=queue,
                priority=priority, broker=broker)
        return broker

    def _run_envelope(self, envelope: Any) -> None:
        self.execute(envelope)

    @property
    def client(self) -> redis.Redis:
        return self.broker.client

    # -- primitives -------------------------------------------------------
    def send(self, jobs: list[Job]) -> None:
        """All jobs in one Redis round trip, through the broker's own enqueue script.

        Same keys and script as ``RedisBroker.enqueue`` (on a pipeline for several
        jobs), with the Redis message id ``<job id>.<attempt>`` instead of a random
        one, so the reconciler can ask Redis whether a task's message still exists.
        """
        try:
            broker = self.broker
            dispatch = broker.scripts["dispatch"]
            now = int(time.time() * 1000)
            calls = [self._enqueue_args(job, now) for job in jobs]
            if len(calls) == 1:
                dispatch(keys=[broker.namespace], args=calls[0])
                return
            pipe = self.client.pipeline(transaction=False)
            for args in calls:
                dispatch(keys=[broker.namespace], client=pipe, args=args)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            raise BackendUnavailable(f"Redis at {mask_redis_url(self.redis_url)} refused the "
                                     f"send: {error_text(exc, self.redis_url)}") from None

    def _enqueue_args(self, job: Job, now: int) -> list[Any]:
        """The enqueue script's arguments for ``job``: what ``actor.send`` would build."""
        broker = self.broker
        message_id = redis_message_id(job.id, job.attempt)
        options: dict[str, Any] = {"redis_message_id": message_id}
        delay = int((job.eta - time.time()) * 1000) if job.eta else 0
        queue_name = job.queue
        if delay > 0:
            queue_name = dq_name(queue_name)
            options["eta"] = now + delay
        message = dramatiq.Message(
            queue_name=queue_name, actor_name=self._actor(job.queue).actor_name,
            args=(job.to_dict(),), kwargs={}, options=options, message_id=job.id,
            message_timestamp=now)
        return ["enqueue", now, queue_name, broker.broker_id, broker.heartbeat_timeout,
                broker.dead_message_ttl, 0, broker._max_unpack_size(), message_id,
                message.encode()]

    def _actor(self, queue: str) -> dramatiq.Actor:
        self.broker  # noqa: B018 - builds the actors
        return self._actors[queue]

    # -- delivery -----------------------------------------------------------
    def missing_jobs(self, jobs: list[tuple[str, int, str]]) -> set[str]:
        """Ids with no message body in Redis: queued, delayed and unacked messages all
        keep their body in ``<queue>.msgs`` / ``<queue>.DQ.msgs`` until acked.

        ``attempt`` is the record's; its message is that attempt (a lost run given
        back) or the next one (a retry or first run), so both are looked for.
        """
        if not jobs:
            return set()
        pipe = self.client.pipeline(transaction=False)
        for job_id, attempt, queue in jobs:
            for key in (f"{NAMESPACE}:{queue}.msgs", f"{NAMESPACE}:{dq_name(queue)}.msgs"):
                for number in {max(attempt, 1), attempt + 1}:
                    pipe.hexists(key, redis_message_id(job_id, number))
        answers = iter(self._execute(pipe))
        missing = set()
        for job_id, attempt, _queue in jobs:
            found = [next(answers) for _ in range(2 * len({max(attempt, 1), attempt + 1}))]
            if not any(found):
                missing.add(job_id)
        return missing

    def maintain(self) -> int:
        """Heartbeat this worker in Redis and give back dead workers' unacked messages.

        Dramatiq heartbeats only when a consumer fetches, so a worker busy with long
        tasks would look dead after ``REDIS_HEARTBEAT_TIMEOUT`` and its messages would
        run twice; here the worker heartbeats at every upkeep. Giving back is done
        here too, marking each message as a redelivery (``dramatiq_redelivery``).
        """
        try:
            return heartbeat_and_give_back(self.client, NAMESPACE, self.broker.broker_id,
                                           self.broker.heartbeat_timeout)
        except (redis.RedisError, OSError) as exc:
            raise BackendUnavailable(f"Redis at {mask_redis_url(self.redis_url)}: "
                                     f"{error_text(exc, self.redis_url)}") from None

    def _execute(self, pipe: Any) -> list[Any]:
        try:
            return pipe.execute()
        except (redis.RedisError, OSError) as exc:
            raise BackendUnavailable(f"Redis at {mask_redis_url(self.redis_url)}: "
                                     f"{error_text(exc, self.redis_url)}") from None

    def take_dead_letters(self) -> list[dict[str, Any]]:
        """Empty Dramatiq's dead-letter sets (``<queue>.XQ``, shared with ``<queue>.DQ``).

        Dramatiq keeps them 7 days where nobody looks; they become ``DeadLetter``
        rows instead (``dead_letters.collect_broker_dead_letters``). Each batch is
        read and removed by one script, so two workers never take the same message.
        """
        from .dramatiq_dead_letters import drain_dead_letter_sets

        try:
            return drain_dead_letter_sets(self.broker, self.settings.QUEUES,
                                          self.settings.DEAD_LETTER_PAYLOAD_LIMIT)
        except (redis.RedisError, OSError) as exc:
            raise BackendUnavailable(f"Redis at {mask_redis_url(self.redis_url)} could not be "
                                     f"drained of dead letters: {error_text(exc, self.redis_url)}"
                                     ) from None

    def queue_depths(self) -> dict[str, dict[str, int]]:
        pipe = self.client.pipeline(transaction=False)
        for queue in self.settings.QUEUES:
            pipe.llen(f"{NAMESPACE}:{queue}")
            pipe.llen(f"{NAMESPACE}:{dq_name(queue)}")
        counts = pipe.execute()
        return {queue: {"queued": counts[2 * i], "delayed": counts[2 * i + 1]}
                for i, queue in enumerate(self.settings.QUEUES)}

    def start_consumer(self, queues: list[str], threads: int, **options: Any) -> "DramatiqConsumer":
        """Consume ``queues`` in the order given (``runworkers --queues low,high``):
        this process's actors take priorities from that order; others are untouched."""
        for queue, priority in _priorities(queues).items():
            self._actor(queue).priority = priority
        worker = PriorityWorker(self.broker, queues=set(queues), worker_threads=threads,
                                worker_timeout=options.get("poll_ms", 100))
        worker.start()
        return DramatiqConsumer(worker)

    def describe(self) -> str:
        return f"Redis {mask_redis_url(self.redis_url)}"

    # -- supervision ----------------------------------------------------------
    def lease_token(self) -> str | None:
        """What names this process's unacked messages in Redis (its broker id)."""
        return self.broker.broker_id

    def discard_reserved(self, lease: str | None, pid: int, job_id: str, queue: str) -> bool:
        """Remove the job's unacked message from process ``lease``'s ack set and its body
        (as an ack would). Looked up by the envelope's id: a delayed message got a new
        Redis id when it became due."""
        if not lease:
            return False
        acks, bodies = f"{NAMESPACE}:__acks__.{lease}.{queue}", f"{NAMESPACE}:{queue}.msgs"
        try:
            message_ids = list(self.client.smembers(acks))
            for message_id, body in zip(message_ids, self.client.hmget(bodies, message_ids)
                                        if message_ids else []):
                if body is not None and _envelope_id(body) == job_id:
                    pipe = self.client.pipeline(transaction=True)
                    pipe.srem(acks, message_id)
                    pipe.hdel(bodies, message_id)
                    return bool(pipe.execute()[0])
        except (redis.RedisError, OSError) as exc:
            raise BackendUnavailable(f"Redis at {mask_redis_url(self.redis_url)}: "
                                     f"{error_text(exc, self.redis_url)}") from None
        return False

    def keep_alive(self, tokens: list[str]) -> None:
        """One ZADD renews the Redis heartbeats of these worker processes."""
        if not tokens:
            return
        try:
            now = int(time.time() * 1000)
            self.client.zadd(f"{NAMESPACE}:__heartbeats__", dict.fromkeys(tokens, now))
        except (redis.RedisError, OSError) as exc:
            raise BackendUnavailable(f"Redis at {mask_redis_url(self.redis_url)}: "
                                     f"{error_text(exc, self.redis_url)}") from None

    def release_dead_worker(self, token: str) -> None:
        """A worker process the supervisor saw die: forget its Redis heartbeat, so the
        next upkeep of any worker gives its unacked messages back at once instead of
        after ``REDIS_HEARTBEAT_TIMEOUT``."""
        try:
            self.client.zrem(f"{NAMESPACE}:__heartbeats__", token)
        except (redis.RedisError, OSError) as exc:
            raise BackendUnavailable(f"Redis at {mask_redis_url(self.redis_url)}: "
                                     f"{error_text(exc, self.redis_url)}") from None

    def purge(self, queues: Iterable[str] | None = None) -> int:
        dropped = 0
        for queue in queues or self.settings.QUEUES:
            depth = self.queue_depths().get(queue, {"queued": 0, "delayed": 0})
            dropped += depth["queued"] + depth["delayed"]
            self.broker.flush(queue)
            self.broker.flush(dq_name(queue))
        return dropped


def _envelope_id(body: bytes) -> str | None:
    try:
        return json.loads(body)["args"][0]["id"]
    except (ValueError, KeyError, IndexError, TypeError, RecursionError):
        return None


def _priorities(queues: list[str]) -> dict[str, int]:
    """Actor priorities, the first queue first (Dramatiq runs lower numbers first)."""
    return {queue: index * 10 - len(queues) * 10 for index, queue in enumerate(queues)}


class PriorityWorker(dramatiq.Worker):
    """A Dramatiq worker whose threads start only after each consumer's first fetch.

    ``dramatiq.Worker`` starts consumer and worker threads together, so against
    a backlog the first message run came from whichever queue answered first,
    not from ``high``. (Priority applies among prefetched messages only.)
    """

    def start(self) -> None:
        threads, self.worker_threads = self.worker_threads, 0
        super().start()  # consumers only
        self.worker_threads = threads
        deadline = time.monotonic() + FIRST_FETCH_WAIT
        while (time.monotonic() < deadline
               and not all(_fetched_once(c) for c in self.consumers.values())):
            time.sleep(0.005)
        for _ in range(threads):
            self._add_worker()


def _fetched_once(thread: Any) -> bool:
    """The consumer fetched once and handed what it got to the work/delay queues."""
    consumer = thread.consumer
    if consumer is None or getattr(consumer, "message_cache", None):
        return False
    return bool(getattr(consumer, "misses", 1) or getattr(consumer, "queued_message_ids", 1))


class DramatiqConsumer:
    def __init__(self, worker: dramatiq.Worker):
        self.worker = worker

    def is_idle(self) -> bool:
        worker = self.worker
        if worker.work_queue.unfinished_tasks:
            return False
        return not any(c.delay_queue.unfinished_tasks for c in worker.consumers.values())

    def stop(self, graceful: bool = True) -> None:
        # Unacked messages are given back to Redis by the broker on close.
        self.worker.stop(timeout=600_000 if graceful else 1)


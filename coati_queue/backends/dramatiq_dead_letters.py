"""Dead letters on the Dramatiq backend: the consumer that never chokes, and the drain.

Stock Dramatiq has two ways to lose sight of a message that cannot run:

* a body its consumer cannot decode (garbage, a pickle, JSON that is not a
  Dramatiq message, odd field types) raises out of the consumer thread, which
  restarts and leaves the rest of the fetched batch reserved, so messages fetched
  along with the bad one never run while the worker lives;
* what it rejects itself (an unknown actor) goes to ``<queue>.XQ`` for 7 days.

``DeadLetteringRedisBroker`` moves every body that cannot run to ``<queue>.XQ``
with Dramatiq's own ``nack``; ``drain_dead_letter_sets`` (called through
``DramatiqDriver.take_dead_letters``) empties those sets so each message becomes a
``DeadLetter`` row. Redis layout: ``dramatiq/brokers/redis/dispatch.lua``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

import dramatiq
import dramatiq.brokers.redis
import dramatiq.common
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.common import dq_name

logger = logging.getLogger("coati_queue")

DRAMATIQ_DLQ_REASON = "rejected by Dramatiq (dead-lettered)"
DRAIN_BATCH = 100
DRAIN_LIMIT = 1000  # per call: one maintenance tick never holds thousands in memory

# KEYS: <queue>.XQ, <queue>.XQ.msgs; ARGV: count, prefix bytes. Returns size, prefix pairs.
TAKE_DEAD_LETTERS = """
local ids = redis.call("zrange", KEYS[1], 0, tonumber(ARGV[1]) - 1)
local out = {}
for _, id in ipairs(ids) do
    local body = redis.call("hget", KEYS[2], id)
    if body then
        table.insert(out, string.len(body))
        table.insert(out, string.sub(body, 1, tonumber(ARGV[2])))
    end
    redis.call("zrem", KEYS[1], id)
    redis.call("hdel", KEYS[2], id)
end
return out
"""

# KEYS: this worker's acks set of a queue, the queue's .msgs hash; ARGV: a body.
# Returns the id of the reserved message with exactly that body.
FIND_RESERVED = """
for _, id in ipairs(redis.call("smembers", KEYS[1])) do
    if redis.call("hget", KEYS[2], id) == ARGV[1] then
        return id
    end
end
return false
"""


def why_dead(broker: RedisBroker, queue: str, payload: bytes, size: int) -> str:
    """What is wrong with a body from a dead-letter set, as far as it can be told."""
    if size > len(payload):
        return f"{DRAMATIQ_DLQ_REASON}; only the first {len(payload):,} of {size:,} bytes kept"
    message, problem = decode_checked(payload, (queue, dq_name(queue)))
    if message is None:
        return f"{DRAMATIQ_DLQ_REASON}: {problem}"
    if message.actor_name not in broker.actors:
        return f"{DRAMATIQ_DLQ_REASON}: no actor named {message.actor_name[:100]!r} in this worker"
    return DRAMATIQ_DLQ_REASON


def decode_checked(body: bytes, queue_names: tuple[str, ...]) -> tuple[Any, str]:
    """(message, "") when ``body`` is a Dramatiq message as this broker writes them for
    one of ``queue_names``; else (None, what is wrong). Dramatiq trusts these fields:
    an odd ``message_id`` or ``queue_name`` kills a consumer or a worker thread."""
    try:
        message = dramatiq.Message.decode(body)
    except dramatiq.DecodeError as exc:
        if isinstance(exc.error, dramatiq.DecodeError):
            return None, "not a Dramatiq message (not valid JSON)"
        if isinstance(exc.error, RecursionError):
            return None, "not a Dramatiq message (JSON nested too deeply)"
        return None, "not a Dramatiq message (JSON without a Dramatiq message's fields)"
    options = message.options
    if not (isinstance(message.message_id, str) and isinstance(message.actor_name, str)
            and isinstance(message.kwargs, dict) and isinstance(options, dict)
            and isinstance(options.get("redis_message_id"), str)):
        return None, "not a Dramatiq message (fields of the wrong type)"
    if message.queue_name not in queue_names:
        return None, f"a Dramatiq message for another queue ({str(message.queue_name)[:64]!r})"
    if len(message.args) != 1 or message.kwargs:
        # Every coati actor takes one job; Dramatiq would log the TypeError and ack it.
        return None, "a Dramatiq message that does not carry exactly one job"
    return message, ""


def drain_dead_letter_sets(broker: RedisBroker, queues: Iterable[str],
                           prefix: int) -> list[dict[str, Any]]:
    """Take (read and remove) up to ``DRAIN_LIMIT`` messages from the queues' ``.XQ`` sets.

    Only the first ``prefix`` bytes of each body cross the wire, with its full size.
    A Redis error after some were taken hands those over (they are gone from Redis);
    before any, it is raised.
    """
    take = broker.client.register_script(TAKE_DEAD_LETTERS)
    taken: list[dict[str, Any]] = []
    try:
        for queue in queues:
            xq = f"{broker.namespace}:{queue}.XQ"
            while len(taken) < DRAIN_LIMIT:
                reply = take(keys=[xq, f"{xq}.msgs"], args=[DRAIN_BATCH, prefix])
                for index in range(0, len(reply), 2):
                    size, payload = int(reply[index]), bytes(reply[index + 1])
                    taken.append({"payload": payload, "queue": queue, "size": size,
                                  "reason": why_dead(broker, queue, payload, size)})
                if len(reply) < 2 * DRAIN_BATCH:
                    break
    except (redis.RedisError, OSError) as exc:
        if not taken:
            raise
        # The error text may hold the URL; the caller reports the next failure masked.
        logger.warning("Draining Dramatiq's dead-letter sets stopped after %d message(s): %s",
                       len(taken), type(exc).__name__)
    return taken


class _DeadLetteringConsumer(dramatiq.brokers.redis._RedisConsumer):
    """Dramatiq's Redis consumer (same fetch, same keys), except for a body it cannot use.

    Dramatiq's own ``__next__`` raises ``DecodeError`` out of the consumer thread,
    which logs it, drops the rest of the fetched batch (left reserved, so those
    messages never run while this worker lives) and restarts; a dead worker's
    reservations are given back later, and the bad body kills the next consumer.
    A decodable body with an odd ``message_id`` or ``queue_name`` crashes it too,
    or kills a worker thread. Here such a body is moved to the queue's dead-letter
    set with Dramatiq's own ``nack`` and the batch goes on; ``take_dead_letters``
    records it.
    """

    def __next__(self) -> Any:
        try:
            while True:
                if not self.message_cache:
                    if not self._fetch():
                        return None
                    continue
                body = self.message_cache.pop(0)
                if body is None:
                    continue  # an id without a body (Dramatiq #266): nothing to run or move
                self.misses = 0
                message, problem = decode_checked(body, (self.queue_name,))
                if message is None:
                    self._reject(body, problem)
                    continue
                self.queued_message_ids.add(message.message_id)
                return dramatiq.MessageProxy(message)
        except redis.ConnectionError as exc:
            raise dramatiq.ConnectionClosed(exc) from None

    def _fetch(self) -> bool:
        """Prefetch as Dramatiq does; when nothing came, back off (long poll) and say so."""
        if self.outstanding_message_count < self.prefetch:
            self.message_cache = self.broker.do_fetch(
                self.queue_name, self.prefetch - self.outstanding_message_count)
        if self.message_cache:
            return True
        self.misses, backoff_ms = dramatiq.common.compute_backoff(self.misses,
                                                                  max_backoff=self.timeout)
        time.sleep(backoff_ms / 1000)
        return False

    def _reject(self, body: bytes, problem: str) -> None:
        broker = self.broker
        keys = [f"{broker.namespace}:__acks__.{broker.broker_id}.{self.queue_name}",
                f"{broker.namespace}:{self.queue_name}.msgs"]
        message_id = broker.client.register_script(FIND_RESERVED)(keys=keys, args=[body])
        if message_id is None:
            logger.error("A message on queue %s that cannot be run (%s) is no longer reserved "
                         "by this worker; nothing moved.", self.queue_name, problem)
            return
        broker.do_nack(self.queue_name, message_id)
        logger.error("Message %s on queue %s cannot be run (%s): moved to its dead-letter set.",
                     message_id.decode("utf-8", "replace"), self.queue_name, problem)


class DeadLetteringRedisBroker(RedisBroker):
    """``RedisBroker`` whose consumers dead-letter undecodable bodies (see above)."""

    @property
    def consumer_class(self) -> type:
        return _DeadLetteringConsumer

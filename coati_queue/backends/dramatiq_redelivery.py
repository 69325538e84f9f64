"""Giving back a dead Dramatiq worker's unacknowledged messages, marked as redeliveries.

Dramatiq's own broker does this on a random 0.1 % of its commands and gives the
message back unchanged, so the next worker cannot tell that it may have run
already. coati's broker turns Dramatiq's random maintenance off and every
worker does it here instead, at each upkeep: an unacked message whose worker
stopped heartbeating for ``REDIS_HEARTBEAT_TIMEOUT`` goes back to its queue with
its envelope's ``delivery`` counted up, so the next worker claims the task's
record before running it (``coati_queue.claims``). Each message is moved by one
small script (remove from the dead worker's ack set, store the marked body,
push it back), so several workers doing this at once move each message once.
"""

from __future__ import annotations

import json
import time
from typing import Any

#: Forget heartbeats of brokers silent this long (senders, long-gone workers).
FORGET_AFTER_MS = 86_400_000

GIVE_BACK = """
if redis.call("srem", KEYS[1], ARGV[1]) == 1 then
    redis.call("hset", KEYS[2], ARGV[1], ARGV[2])
    redis.call("rpush", KEYS[3], ARGV[1])
    return 1
end
return 0
"""


def mark_redelivered(body: bytes) -> bytes:
    """A Dramatiq message body whose coati envelope has ``delivery`` counted up."""
    try:
        message = json.loads(body)
        envelope = message["args"][0]
        envelope["delivery"] = int(envelope.get("delivery", 1)) + 1
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
        return body  # not one of ours: the consumer dead-letters it as it is
    return json.dumps(message, separators=(",", ":")).encode()


def heartbeat_and_give_back(client: Any, namespace: str, broker_id: str,
                            heartbeat_timeout_ms: int) -> int:
    """Heartbeat ``broker_id``; give back every dead worker's unacked messages."""
    heartbeats = f"{namespace}:__heartbeats__"
    now = int(time.time() * 1000)
    client.zadd(heartbeats, {broker_id: now})
    live = {member.decode() for member in
            client.zrangebyscore(heartbeats, now - heartbeat_timeout_ms, "+inf")}
    give_back = client.register_script(GIVE_BACK)
    prefix = f"{namespace}:__acks__."
    moved = 0
    for key in client.scan_iter(match=prefix + "*", count=500):
        worker, _, queue_name = key.decode()[len(prefix):].partition(".")
        if worker in live or not queue_name:
            continue
        messages = f"{namespace}:{queue_name}.msgs"
        for message_id in client.smembers(key):
            body = client.hget(messages, message_id)
            if body is None:  # acked meanwhile, or its body expired: nothing to give back
                client.srem(key, message_id)
                continue
            moved += give_back(keys=[key, messages, f"{namespace}:{queue_name}"],
                               args=[message_id, mark_redelivered(body)])
    client.zremrangebyscore(heartbeats, 0, now - FORGET_AFTER_MS)
    return moved

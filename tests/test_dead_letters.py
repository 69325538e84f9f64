"""Dead letters: every message no worker can run becomes a visible, requeueable row.

Real components throughout: garbage is planted straight into Huey's queue
directory and into Redis (as another client could write it), real burst
workers consume it, and the admin is driven through the Django test client.
"""

from __future__ import annotations

import json
import os
import pickle
import time
from typing import Any

import pytest
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from coati_queue import dead_letters
from coati_queue.core.jobs import Job
from coati_queue.models import DeadLetter, TaskResult
from coati_queue.selection import get_queue_driver
from tests.conftest import describe_failure, logged_in, make_user, queue_settings

pytestmark = pytest.mark.django_db(transaction=True)

GARBAGE = b"\x80\x04 this is not JSON {\xff"
PICKLE = pickle.dumps({"coati-pickle-marker": [1, 2, 3]}, protocol=4)
CHANGELIST = "admin:coati_queue_deadletter_changelist"


# -- planting messages as a foreign client would -----------------------------------------
def plant_huey_file(driver: Any, data: bytes, sequence: int) -> None:
    """A file in Huey's queue directory, named the way the storage names its own."""
    storage = driver.huey.storage
    name = "%04x-%012x-%010x-%d" % (storage.MAX_PRIORITY - driver.settings.queue_priority(
        "default"), int(time.time() * 1000), sequence, 424242)
    with open(os.path.join(driver.path, "queue", name), "wb") as handle:
        handle.write(data)


def plant_redis_message(driver: Any, message_id: str, data: bytes, queue: str = "default") -> None:
    """The layout of dramatiq/brokers/redis/dispatch.lua ``enqueue``: body hash + id list."""
    driver.client.hset(f"coati:{queue}.msgs", message_id, data)
    driver.client.rpush(f"coati:{queue}", message_id)


def plant_dramatiq_dead_letter(driver: Any, message_id: str, data: bytes,
                               queue: str = "default") -> None:
    """What Dramatiq's ``nack`` leaves: a member of ``<queue>.XQ`` and its body."""
    driver.client.zadd(f"coati:{queue}.XQ", {message_id: int(time.time() * 1000)})
    driver.client.hset(f"coati:{queue}.XQ.msgs", message_id, data)


def envelope(task: str = "tests.add", args: list | None = None, **fields: Any) -> str:
    fields.setdefault("queue", "default")
    return Job(task=task, args=[20, 1] if args is None else args, **fields).encode()


def dramatiq_wrapper(job_json: str, actor: str = "coati.default", queue: str = "default",
                     **fields: Any) -> bytes:
    """A Dramatiq message as ``RedisBroker.enqueue`` writes it, around a coati job."""
    message = {"queue_name": queue, "actor_name": actor, "args": [json.loads(job_json)],
               "kwargs": {}, "options": {"redis_message_id": "m-1"}, "message_id": "m-1",
               "message_timestamp": 1}
    return json.dumps({**message, **fields}).encode()


@pytest.fixture
def huey_queue(queue_env, huey_path):
    queue_env(COATI_QUEUE_BACKEND="huey", COATI_QUEUE_PATH=huey_path)
    return get_queue_driver()


@pytest.fixture
def dramatiq_queue(queue_env, redis_url):
    queue_env(COATI_QUEUE_BACKEND="dramatiq", REDIS_URL=redis_url)
    return get_queue_driver()


# -- record: the last line of defence ------------------------------------------------------
def test_record_keeps_bytes_as_escaped_text_and_peeks_the_envelope(huey_queue):
    garbage = dead_letters.record(GARBAGE, "bad", backend="huey")
    assert garbage.payload == "\\x80\x04 this is not JSON {\\xff"
    assert garbage.payload_size == len(GARBAGE) and not garbage.truncated
    assert (garbage.task_name, garbage.task_id, garbage.source) == ("", "", "worker")

    job = Job.decode(envelope(queue="low"))
    letter = dead_letters.record(job.encode().encode(), "unknown field", backend="huey",
                                 seen_by="host:1:abc")
    assert (letter.task_name, letter.task_id, letter.queue) == ("tests.add", job.id, "low")
    assert letter.seen_by == "host:1:abc"
    wrapped = dead_letters.record(dramatiq_wrapper(job.encode()), "x", backend="dramatiq",
                                  queue="default")
    assert (wrapped.task_name, wrapped.task_id, wrapped.queue) == ("tests.add", job.id,
                                                                   "default")
    as_dict = dead_letters.record(job.to_dict(), "unknown task", backend="huey")
    assert json.loads(as_dict.payload)["id"] == job.id and as_dict.task_name == "tests.add"


def test_record_survives_huge_deep_and_hostile_payloads(huey_queue):
    limit = huey_queue.settings.DEAD_LETTER_PAYLOAD_LIMIT
    huge = dead_letters.record("x" * 20_000_000, "too large", backend="huey")
    assert huge.truncated and huge.payload_size == 20_000_000
    assert len(huge.payload.encode()) == limit

    deep = "[" * 10_000 + "]" * 10_000
    nested = dead_letters.record(deep, "too deep", backend="huey")
    assert nested.payload == deep and nested.task_name == ""
    deep_object = '{"task": ' * 10_000 + "1" + "}" * 10_000
    assert dead_letters.record(deep_object.encode(), "deep", backend="huey").task_name == ""

    euro = dead_letters.record("€" * limit, "multibyte", backend="huey")  # cut between chars
    assert euro.truncated and euro.payload == "€" * (limit // 3)

    hostile = dead_letters.record('{"task": "t\x00", "id": "\ud800"}', "r\x00" * 5000,
                                  backend="b" * 50, queue="q" * 300, source="s" * 100)
    assert "\x00" not in hostile.payload and "\\x00" in hostile.payload
    assert len(hostile.reason) == dead_letters.REASON_LIMIT
    assert (len(hostile.backend), len(hostile.queue), len(hostile.source)) == (16, 64, 32)

    class Unprintable:
        def __repr__(self):
            raise RecursionError

    odd = dead_letters.record({"a": Unprintable()}, "object", backend="huey")
    assert odd.payload == "<dict that cannot be shown>"
    assert DeadLetter.objects.count() == 6


# -- real workers: nothing stops them, everything is recorded ------------------------------
def test_huey_worker_dead_letters_garbage_and_pickle_files(huey_queue, run_workers):
    driver = huey_queue
    plant_huey_file(driver, GARBAGE, 0)
    plant_huey_file(driver, PICKLE, 1)
    time.sleep(0.01)  # Huey orders files by millisecond: the valid task comes last
    valid = driver.enqueue("tests.add", 20, 1)

    completed = run_workers("huey")
    assert completed.returncode == 0, describe_failure(completed)

    letters = list(DeadLetter.objects.order_by("payload_size"))
    assert len(letters) == 2, [(d.reason, d.payload[:80]) for d in letters]
    garbage, pickled = sorted(letters, key=lambda d: "coati-pickle-marker" in d.payload)
    assert "this is not JSON {" in garbage.payload
    assert "coati-pickle-marker" in pickled.payload
    for letter in letters:
        assert letter.source == "huey-file" and letter.backend == "huey"
        assert letter.reason.startswith("undecodable Huey message")
        assert letter.requeued_at is None
    assert driver.get_task_result(valid)["status"] == "completed"
    assert driver.get_task_result(valid)["result"] == 21
    assert not TaskResult.objects.exclude(pk=valid).exists()  # no fake task records


def test_dramatiq_worker_dead_letters_undecodable_messages(dramatiq_queue, run_workers):
    driver = dramatiq_queue
    plant_redis_message(driver, "garbage-1", GARBAGE)
    first = driver.enqueue("tests.add", 1, 2)  # fetched in the same batch as the garbage
    plant_redis_message(driver, "pickle-1", PICKLE)
    plant_redis_message(driver, "json-not-dramatiq", b'{"foo": 1}')
    valid = driver.enqueue("tests.add", 20, 1)
    plant_redis_message(driver, "delayed-garbage", b"delayed garbage", queue="default.DQ")
    # Decodable, but stock Dramatiq would hang a worker thread (another queue), crash the
    # consumer (a list as id) or ack it silently after a TypeError (no job argument).
    odd = {"another-queue": dramatiq_wrapper(envelope(), queue="nowhere"),
           "list-id": dramatiq_wrapper(envelope(), message_id=["unhashable"]),
           "no-job": dramatiq_wrapper(envelope(), args=[])}
    for message_id, body in odd.items():
        plant_redis_message(driver, message_id, body)
    last = driver.enqueue("tests.add", 2, 2)

    completed = run_workers("dramatiq")
    assert completed.returncode == 0, describe_failure(completed)

    letters = {d.payload: d for d in DeadLetter.objects.all()}
    assert len(letters) == 7, [(d.reason, d.payload[:80]) for d in letters.values()]
    assert "delayed garbage" in letters  # the delay queue's consumer too
    reasons = {name: letters[body.decode()].reason for name, body in odd.items()}
    assert reasons["another-queue"].endswith("a Dramatiq message for another queue ('nowhere')")
    assert reasons["list-id"].endswith("(fields of the wrong type)")
    assert reasons["no-job"].endswith("a Dramatiq message that does not carry exactly one job")
    assert letters[odd["no-job"].decode()].task_name == ""  # no job inside to name
    assert "\\x80\x04 this is not JSON {\\xff" in letters
    assert any("coati-pickle-marker" in payload for payload in letters)
    assert letters['{"foo": 1}'].reason.endswith("(JSON without a Dramatiq message's fields)")
    for letter in letters.values():
        assert letter.source == "dramatiq-dlq" and letter.backend == "dramatiq"
        assert letter.queue == "default"
        assert letter.reason.startswith("rejected by Dramatiq (dead-lettered)")
    # The consumer neither died on them nor stranded the messages fetched with them.
    assert driver.get_task_result(first)["result"] == 3
    assert driver.get_task_result(valid)["result"] == 21
    assert driver.get_task_result(last)["result"] == 4
    # Nothing left behind in Redis: not queued, not reserved, not in a dead-letter set.
    assert driver.client.hlen("coati:default.msgs") == 0
    assert driver.client.hlen("coati:default.DQ.msgs") == 0
    assert not driver.client.keys("coati:__acks__*")
    assert not driver.client.keys("coati:*.XQ*")


def test_dramatiq_dead_letter_set_is_drained_into_rows(dramatiq_queue):
    driver = dramatiq_queue
    job = envelope()
    plant_dramatiq_dead_letter(driver, "xq-garbage", GARBAGE)
    plant_dramatiq_dead_letter(driver, "xq-unknown-actor",
                               dramatiq_wrapper(job, "coati.gone", queue="low"), queue="low")
    big = b"y" * (driver.settings.DEAD_LETTER_PAYLOAD_LIMIT + 10)
    plant_dramatiq_dead_letter(driver, "xq-big", big, queue="high")
    for index in range(150):  # more than one batch of the drain script
        plant_dramatiq_dead_letter(driver, f"xq-bulk-{index}", b"bulk %d" % index)

    assert dead_letters.collect_broker_dead_letters(driver, seen_by="w1") == 153
    assert not driver.client.keys("coati:*XQ*")
    rows = DeadLetter.objects.filter(source="dramatiq-dlq", backend="dramatiq", seen_by="w1")
    assert rows.count() == 153
    unknown = rows.get(queue="low")
    assert unknown.reason == ("rejected by Dramatiq (dead-lettered): no actor named "
                              "'coati.gone' in this worker")
    assert (unknown.task_name, unknown.task_id) == ("tests.add", json.loads(job)["id"])
    large = rows.get(queue="high")
    assert large.truncated and large.payload_size == len(big)
    assert "only the first" in large.reason
    assert rows.get(payload__startswith="\\x80").reason.endswith("(not valid JSON)")
    assert dead_letters.collect_broker_dead_letters(driver) == 0  # nothing taken twice


# -- requeue --------------------------------------------------------------------------------
def requeue_action(client: Client, *letters: DeadLetter, follow: bool = True) -> Any:
    return client.post(reverse(CHANGELIST), {
        "action": "requeue_selected", "_selected_action": [d.pk for d in letters]},
        follow=follow)


def messages_of(response: Any) -> str:
    return " | ".join(str(m) for m in response.context["messages"])


def test_requeue_action_sends_it_again_and_it_runs(huey_queue, run_workers,
                                                   django_user_model):
    runnable = dead_letters.record(envelope(max_retries=7), "worker crashed", backend="huey")
    garbage = dead_letters.record(GARBAGE, "not JSON", backend="huey")
    operator = logged_in(make_user(django_user_model, "operator", "view_deadletter",
                                   "change_deadletter"))

    response = requeue_action(operator, runnable, garbage)
    text = messages_of(response)
    assert "1 dead letter was requeued as a new task." in text
    assert f"Dead letter #{garbage.pk} was not requeued: message is not" in text
    runnable.refresh_from_db()
    garbage.refresh_from_db()
    assert runnable.requeued_at is not None and garbage.requeued_at is None
    record = TaskResult.objects.get(pk=runnable.requeued_as)
    assert str(record.pk) != runnable.task_id  # a new task, not the old id
    assert (record.task_name, record.args, record.max_retries) == ("tests.add", [20, 1], 7)

    completed = run_workers("huey")
    assert completed.returncode == 0, describe_failure(completed)
    record.refresh_from_db()
    assert (record.status, record.result, record.attempts) == ("completed", 21, 1)

    again = requeue_action(operator, runnable)
    assert "was not requeued: already requeued as task" in messages_of(again)
    assert TaskResult.objects.filter(task_name="tests.add").count() == 1
    requeued_at = runnable.requeued_at
    runnable.refresh_from_db()
    assert runnable.requeued_at == requeued_at


def test_requeue_refuses_what_cannot_run(huey_queue, django_user_model):
    limit = huey_queue.settings.DEAD_LETTER_PAYLOAD_LIMIT
    truncated = dead_letters.record(envelope(args=["z" * limit]), "large", backend="huey")
    unknown = dead_letters.record(envelope("tests.no_such_task"), "unknown", backend="huey")
    sent, errors = dead_letters.requeue([truncated, unknown])
    assert sent == []
    assert errors[truncated.pk].startswith("only the first")
    assert errors[unknown.pk] == "no task named tests.no_such_task is registered"
    assert not TaskResult.objects.exists()


def test_a_whole_dramatiq_message_is_requeued_as_its_job(dramatiq_queue, run_workers):
    job = envelope(queue="gone")  # its queue is no longer configured: the default is used
    letter = dead_letters.record(dramatiq_wrapper(job, "coati.gone"), "no actor",
                                 backend="dramatiq", source="dramatiq-dlq")
    sent, errors = dead_letters.requeue([letter])
    assert errors == {} and len(sent) == 1
    assert TaskResult.objects.get(pk=sent[0]).queue == "default"
    completed = run_workers("dramatiq")
    assert completed.returncode == 0, describe_failure(completed)
    assert dramatiq_queue.get_task_result(sent[0])["result"] == 21


# -- admin: who may do what, and nothing from a payload is rendered --------------------------
def test_view_only_user_sees_them_but_cannot_requeue_or_delete(huey_queue, django_user_model):
    letter = dead_letters.record(envelope(), "r", backend="huey")
    viewer = logged_in(make_user(django_user_model, "viewer", "view_deadletter"))
    assert viewer.get(reverse(CHANGELIST)).status_code == 200
    change = reverse("admin:coati_queue_deadletter_change", args=[letter.pk])
    assert viewer.get(change).status_code == 200
    assert requeue_action(viewer, letter).status_code == 403
    assert viewer.post(reverse(CHANGELIST), {"action": "delete_selected",
                                             "_selected_action": [letter.pk],
                                             "post": "yes"}).status_code == 403
    assert viewer.post(change, {"reason": "edited"}).status_code == 403
    letter.refresh_from_db()
    assert letter.requeued_at is None and letter.reason == "r"
    nobody = logged_in(make_user(django_user_model, "nobody"))
    assert nobody.get(reverse(CHANGELIST)).status_code == 403
    assert nobody.get(change).status_code == 403


def test_delete_action_needs_the_delete_permission(huey_queue, django_user_model):
    letters = [dead_letters.record(GARBAGE, f"r{i}", backend="huey") for i in range(3)]
    operator = logged_in(make_user(django_user_model, "operator", "view_deadletter",
                                   "change_deadletter"))
    data = {"action": "delete_selected", "_selected_action": [d.pk for d in letters[:2]]}
    assert operator.post(reverse(CHANGELIST), {**data, "post": "yes"}).status_code == 403
    assert DeadLetter.objects.count() == 3
    cleaner = logged_in(make_user(django_user_model, "cleaner", "view_deadletter",
                                  "delete_deadletter"))
    confirm = cleaner.post(reverse(CHANGELIST), data)
    assert confirm.status_code == 200 and b"Are you sure" in confirm.content
    assert DeadLetter.objects.count() == 3
    done = cleaner.post(reverse(CHANGELIST), {**data, "post": "yes"})
    assert done.status_code == 302
    assert list(DeadLetter.objects.values_list("pk", flat=True)) == [letters[2].pk]
    assert requeue_action(cleaner, letters[2]).status_code == 403  # no change permission


def test_payload_and_reason_are_shown_escaped(admin_client):
    letter = dead_letters.record(b'<script>alert(1)</script>{"task": "<b>x</b>"',
                                 "bad <img src=x onerror=alert(2)>", backend="huey")
    html = admin_client.get(reverse("admin:coati_queue_deadletter_change",
                                    args=[letter.pk])).content.decode()
    assert '<pre class="coati-pre">&lt;script&gt;alert(1)&lt;/script&gt;' in html
    assert "<script>alert(1)" not in html and "<img src=x" not in html
    assert 'name="_save"' not in html
    listing = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert "&lt;img src=x" in listing and "<img src=x" not in listing


def test_changelist_filters_and_search(admin_client, huey_queue):
    job = Job.decode(envelope())
    by_task = dead_letters.record(job.encode(), "worker crashed", backend="huey")
    from_file = dead_letters.record(GARBAGE, "undecodable Huey message: x", backend="huey",
                                    source="huey-file")
    done = dead_letters.record(GARBAGE, "old", backend="huey")
    DeadLetter.objects.filter(pk=done.pk).update(requeued_at=timezone.now(),
                                                 requeued_as=job.id)

    def listed(**query: str) -> set[int]:
        response = admin_client.get(reverse(CHANGELIST), query)
        return {d.pk for d in response.context["cl"].result_list}

    assert listed() == {by_task.pk, from_file.pk, done.pk}
    assert listed(source="huey-file") == {from_file.pk}
    assert listed(queue="default") == {by_task.pk}
    assert listed(queue="__other__") == {from_file.pk, done.pk}  # no queue known
    assert listed(requeued="no") == {by_task.pk, from_file.pk}
    assert listed(requeued="yes") == {done.pk}
    assert listed(q=job.id) == {by_task.pk}
    assert listed(q="tests.add") == {by_task.pk}
    assert listed(q="crashed") == {by_task.pk}


# -- counts: queuestats, /metrics and the overview ----------------------------------------
def test_queuestats_metrics_and_overview_count_waiting_dead_letters(huey_queue, tmp_path,
                                                                    admin_client):
    from io import StringIO

    from django.core.management import call_command

    dead_letters.record(GARBAGE, "a", backend="huey")
    dead_letters.record(GARBAGE, "b", backend="huey", source="huey-file")
    requeued = dead_letters.record(GARBAGE, "c", backend="huey", source="dramatiq-dlq")
    DeadLetter.objects.filter(pk=requeued.pk).update(requeued_at=timezone.now())

    out = StringIO()
    call_command("queuestats", "--json", stdout=out)
    assert json.loads(out.getvalue())["dead_letters"] == {
        "waiting": 2, "by_source": {"worker": 1, "huey-file": 1, "dramatiq-dlq": 0}}
    table = StringIO()
    call_command("queuestats", stdout=table)
    assert "Dead letters waiting: 2 (huey-file 1, worker 1)" in table.getvalue()

    token = "dead-letter-metrics-token"
    with override_settings(COATI_QUEUE=queue_settings(tmp_path, METRICS_TOKEN=token)):
        response = Client().get(reverse("coati_queue:metrics"),
                                HTTP_AUTHORIZATION=f"Bearer {token}")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(response.content.decode())
               for s in family.samples if s.name == "coati_queue_dead_letters"}
    assert samples == {("coati_queue_dead_letters", (("source", "worker"),)): 1.0,
                       ("coati_queue_dead_letters", (("source", "huey-file"),)): 1.0,
                       ("coati_queue_dead_letters", (("source", "dramatiq-dlq"),)): 0.0}

    overview = admin_client.get(reverse("admin:coati_queue_taskresult_overview"))
    html = overview.content.decode()
    assert 'id="coati-dead-letters" data-waiting="2"' in html
    assert f'{reverse(CHANGELIST)}?requeued=no' in html
    spanish = admin_client.get(reverse("admin:coati_queue_taskresult_overview"),
                               HTTP_ACCEPT_LANGUAGE="es").content.decode()
    assert "2 mensajes no procesables en espera" in spanish
    listing = admin_client.get(reverse(CHANGELIST), HTTP_ACCEPT_LANGUAGE="es").content.decode()
    assert "Reencolar los mensajes no procesables seleccionados" in listing

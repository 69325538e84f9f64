"""Side by side: the same Django tasks on Django's own ImmediateBackend and on coati_queue.

Each scenario is enqueued on both; coati's runs on the backend under test (real
``runworkers`` for Huey and Dramatiq, where ``task_started``/``task_finished``
fire in the worker process and are logged to a file by tests/testapp). What a
user can observe must match: status, return value, errors (class and the
exception's text), attempts, and the signals with the status each carried.
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("django.tasks", reason="django.tasks exists from Django 6.0")

from django.tasks import TaskResultStatus  # noqa: E402
from django.test import override_settings  # noqa: E402

from tests.testapp import django_task_defs as defs  # noqa: E402

pytestmark = pytest.mark.django_db(transaction=True)

DJANGO = "django_immediate"
SCENARIOS = [
    (defs.add_numbers, (2, 3), {}),
    (defs.break_rule_at_length, ("emp_7",), {}),
    (defs.exit_process, (3,), {}),
    (defs.report_attempt, (), {"label": "x"}),
    (defs.add_later, (1, 2), {}),
]


def observed(result, signals):
    """What a user of either backend sees of a finished result."""
    if result.status == TaskResultStatus.SUCCESSFUL:
        value = result.return_value
        if isinstance(value, dict) and value.get("id") == result.id:
            value = {**value, "id": "<own id>"}  # ids differ by backend, not semantics
    else:
        value = None
    return {
        "status": result.status, "finished": result.is_finished, "value": value,
        "attempts": result.attempts,
        # The exception's class and its own text (the lines after the last frame).
        "errors": [(error.exception_class, error.traceback.rstrip().splitlines()[-3:])
                   for error in result.errors],
        "signals": [(line["signal"], line["status"], line["errors"], line["attempts"])
                    for line in signals if line["id"] == result.id],
    }


def test_coati_gives_what_djangos_immediate_backend_gives(backend, tmp_path, monkeypatch,
                                                          settings):
    log = tmp_path / "signals.jsonl"
    monkeypatch.setenv(defs.SIGNAL_LOG, str(log))  # workers inherit it
    tasks = {**settings.TASKS,
             DJANGO: {"BACKEND": "django.tasks.backends.immediate.ImmediateBackend"}}
    with override_settings(TASKS=tasks):
        pairs = [(task.using(backend=DJANGO).enqueue(*args, **kwargs),
                  task.enqueue(*args, **kwargs)) for task, args, kwargs in SCENARIOS]
        backend.drain()
        signals = [json.loads(line) for line in log.read_text().splitlines()]
        for (task, _args, _kwargs), (theirs, ours) in zip(SCENARIOS, pairs):
            ours.refresh()
            assert observed(ours, signals) == observed(theirs, signals), task.name
            assert observed(ours, signals)["signals"], task.name  # not vacuously equal
    senders = {line["sender"] for line in signals}
    assert senders == {"ImmediateBackend", "CoatiTaskBackend"}
    ran_in = {line["pid"] for line in signals
              if line["sender"] == "CoatiTaskBackend" and line["signal"] != "enqueued"}
    # started/finished come from the worker process (from this one on the immediate backend)
    assert (os.getpid() in ran_in) is (not backend.queues_work) and len(ran_in) == 1

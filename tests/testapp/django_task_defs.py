"""Functions of Django's own tasks framework (Django 6+), run by coati_queue's backend.

With ``COATI_TEST_SIGNAL_LOG`` naming a file, every ``task_enqueued`` /
``task_started`` / ``task_finished`` of any backend appends a JSON line to it, in
whichever process sends it (the test process, or a worker subprocess that imported
this module to run a task), so a test compares what each backend signalled.
"""

import asyncio
import json
import os

from django.tasks import task
from django.tasks.signals import task_enqueued, task_finished, task_started

SIGNAL_LOG = "COATI_TEST_SIGNAL_LOG"


class RuleBroken(Exception):
    """A host error: its dotted path must come back in the task result."""


@task
def add_numbers(a, b):
    return a + b


@task
def break_rule(employee):
    raise RuleBroken(f"rule broke for {employee}")


@task
def break_rule_at_length(employee):
    """A message over several lines and a note: the traceback's last line is neither
    the exception's class nor its first message line."""
    error = RuleBroken(f"rule broke for {employee}\nSecond line: contract: 7")
    error.add_note("Note: the contract ended")
    raise error


@task
def exit_process(code):
    raise SystemExit(code)


@task
def interrupt():
    raise KeyboardInterrupt("pressed ctrl-c inside a task")


@task(takes_context=True)
def report_attempt(context, label):
    return {"label": label, "attempt": context.attempt, "id": context.task_result.id}


@task(takes_context=True)
def describe_own_task(context):
    """What the worker's context says about the task as it was enqueued."""
    own = context.task_result.task
    return {"queue": own.queue_name, "backend": own.backend,
            "run_after": own.run_after.isoformat() if own.run_after else None}


@task(queue_name="high")
def on_high_queue():
    return ("tuples", "become", "lists")


@task
async def add_later(a, b):
    await asyncio.sleep(0)
    return a + b


def plain_function(*args):
    """Not a task: a record naming it must not be read back as one."""
    return args


def _signal_logger(name):
    def record(sender, task_result, **kwargs):
        path = os.environ.get(SIGNAL_LOG)
        if not path:
            return
        line = json.dumps({
            "signal": name, "id": task_result.id, "backend": task_result.backend,
            "task": task_result.task.name, "status": str(task_result.status),
            "errors": [error.exception_class_path for error in task_result.errors],
            "attempts": task_result.attempts, "pid": os.getpid(), "sender": sender.__name__})
        with open(path, "a") as handle:  # one short append per line: processes interleave
            handle.write(line + "\n")

    return record


for _name, _signal in (("enqueued", task_enqueued), ("started", task_started),
                       ("finished", task_finished)):
    _signal.connect(_signal_logger(_name), weak=False, dispatch_uid=f"coati-test-{_name}")

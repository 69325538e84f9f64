"""Functions of Django's own tasks framework (Django 6+), run by coati_queue's backend."""

from django.tasks import task


class RuleBroken(Exception):
    """A host error: its dotted path must come back in the task result."""


@task
def add_numbers(a, b):
    return a + b


@task
def break_rule(employee):
    raise RuleBroken(f"rule broke for {employee}")


@task(takes_context=True)
def report_attempt(context, label):
    return {"label": label, "attempt": context.attempt, "id": context.task_result.id}


@task(queue_name="high")
def on_high_queue():
    return ("tuples", "become", "lists")

"""The admin when things go wrong: the queue is down, permissions are partial, data is odd.

The broker outage is real: the Dramatiq backend pointed at a port where no
Redis listens, with the password in the URL's query string, which redis-py
accepts and which must never be shown.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from django.test import Client, override_settings
from django.urls import reverse

from coati_queue.conf import get_settings
from coati_queue.models import (BatchStatus, ItemStatus, PayrollBatch, PayrollItem, TaskResult,
                                TaskStatus)
from coati_queue.redis_url import mask_redis_url, scrub
from tests.conftest import free_port, logged_in, make_user, queue_settings

pytestmark = [pytest.mark.django_db(transaction=True),  # sends happen at commit, as for users
              pytest.mark.usefixtures("private_queue")]

SECRET = "QuerySecret42"


@pytest.fixture
def queue_down(tmp_path: Any) -> Any:
    """Dramatiq against a closed port; the password rides in the query string."""
    url = f"redis://127.0.0.1:{free_port()}/0?password={SECRET}"
    with override_settings(COATI_QUEUE=queue_settings(tmp_path, BACKEND="dramatiq",
                                                      REDIS_URL=url, REDIS_TIMEOUT=0.2)):
        yield url


def failed_task(**fields: Any) -> TaskResult:
    values = {"task_name": "tests.add", "queue": "default", "backend": "huey",
              "status": TaskStatus.FAILED, "args": [1, 2], "kwargs": {}}
    return TaskResult.objects.create(**{**values, **fields})


def finished_batch(**fields: Any) -> PayrollBatch:
    values = {"planilla_id": "planilla_test", "periodo_inicio": datetime.date(2024, 1, 1),
              "periodo_fin": datetime.date(2024, 1, 15),
              "status": BatchStatus.COMPLETED_WITH_ERRORS, "total": 2, "succeeded": 1,
              "failed": 1}
    return PayrollBatch.objects.create(**{**values, **fields})


# -- the queue is down ----------------------------------------------------------------------
def test_retry_while_the_queue_is_down_changes_nothing_and_says_why(admin_client: Client,
                                                                    queue_down: str) -> None:
    original = failed_task()
    response = admin_client.post(reverse("admin:coati_queue_taskresult_changelist"), {
        "action": "retry_selected", "_selected_action": [str(original.pk)]}, follow=True)
    assert response.status_code == 200
    text = response.content.decode()
    assert "the queue is unavailable" in text
    assert SECRET not in text
    assert list(TaskResult.objects.values_list("pk", flat=True)) == [original.pk]  # no orphan


def test_start_payroll_while_the_queue_is_down_frees_the_period(admin_client: Client,
                                                                queue_down: str) -> None:
    form = {"planilla_id": "planilla_test", "periodo_inicio": "2024-01-01",
            "periodo_fin": "2024-01-15"}
    url = reverse("admin:coati_queue_payrollbatch_start")
    response = admin_client.post(url, form)
    assert response.status_code == 200  # the form again, with the reason
    text = response.content.decode()
    assert "could not be queued" in text and SECRET not in text
    (batch,) = PayrollBatch.objects.all()
    assert batch.status == BatchStatus.FAILED and SECRET not in batch.error
    # The failed batch does not block the period: the next try is refused only by the queue.
    again = admin_client.post(url, form).content.decode()
    assert "already" not in again and "could not be queued" in again


def test_redis_passwords_are_masked_in_the_query_string_too() -> None:
    url = f"redis://user:{SECRET}@host:6379/0?password={SECRET}2&db=1"
    masked = mask_redis_url(url)
    assert SECRET not in masked
    assert masked == "redis://user:***@host:6379/0?password=***&db=1"
    assert SECRET not in scrub(f"Error connecting: {SECRET}2 at host", url)


def test_settings_repr_keeps_secrets_out(tmp_path: Any) -> None:
    with override_settings(COATI_QUEUE=queue_settings(
            tmp_path, REDIS_URL=f"redis://:{SECRET}@h/0", METRICS_TOKEN="token-" + SECRET)):
        text = repr(get_settings())
    assert SECRET not in text and "QUEUES" in text


# -- partial permissions --------------------------------------------------------------------
def test_a_view_only_post_of_a_task_action_is_refused(django_user_model: Any) -> None:
    original = failed_task()
    client = logged_in(make_user(django_user_model, "viewer", "view_taskresult"))
    url = reverse("admin:coati_queue_taskresult_changelist")
    for action in ("retry_selected", "retry_all_failed_of_names", "delete_selected"):
        response = client.post(url, {"action": action, "_selected_action": [str(original.pk)]})
        assert response.status_code == 403, action
    assert list(TaskResult.objects.values_list("pk", flat=True)) == [original.pk]


def test_a_batch_operator_opens_failed_items_without_task_permissions(
        django_user_model: Any) -> None:
    batch = finished_batch()
    task = failed_task(task_name="coati.payroll.calculate_chunk", status=TaskStatus.COMPLETED)
    item = PayrollItem.objects.create(batch=batch, employee_id="e1", status=ItemStatus.FAILED,
                                      error="Employee inactive: e1", traceback="Traceback …",
                                      task=task)
    client = logged_in(make_user(django_user_model, "operator", "view_payrollbatch"))
    html = client.get(reverse("admin:coati_queue_payrollbatch_change",
                              args=[batch.pk])).content.decode()
    item_url = reverse("admin:coati_queue_payrollitem_change", args=[item.pk])
    assert item_url in html
    assert reverse("admin:coati_queue_taskresult_change", args=[task.pk]) not in html
    assert client.get(item_url).status_code == 200
    listing = client.get(reverse("admin:coati_queue_payrollbatch_changelist")).content.decode()
    assert reverse("admin:coati_queue_taskresult_overview") not in listing
    app = client.get(reverse("admin:app_list", args=["coati_queue"])).content.decode()
    assert 'id="coati-overview-link"' not in app


# -- deleting -------------------------------------------------------------------------------
def test_a_finished_batch_can_be_deleted_with_its_items(admin_client: Client) -> None:
    batch = finished_batch()
    PayrollItem.objects.create(batch=batch, employee_id="e1", status=ItemStatus.FAILED)
    url = reverse("admin:coati_queue_payrollbatch_delete", args=[batch.pk])
    assert "payroll item" not in admin_client.get(url).context["perms_lacking"]
    assert admin_client.post(url, {"post": "yes"}).status_code == 302
    assert not PayrollBatch.objects.exists() and not PayrollItem.objects.exists()
    running = finished_batch(status=BatchStatus.RUNNING)
    assert admin_client.post(reverse("admin:coati_queue_payrollbatch_delete",
                                     args=[running.pk]), {"post": "yes"}).status_code == 403


def test_unfinished_task_records_are_kept_when_deleting(admin_client: Client) -> None:
    done = failed_task()
    pending = failed_task(status=TaskStatus.PENDING)
    assert admin_client.get(reverse("admin:coati_queue_taskresult_delete",
                                    args=[pending.pk])).status_code == 403
    response = admin_client.post(reverse("admin:coati_queue_taskresult_changelist"), {
        "action": "delete_selected", "_selected_action": [str(done.pk), str(pending.pk)],
        "post": "yes"}, follow=True)
    assert "has not finished and was kept" in response.content.decode()
    assert list(TaskResult.objects.values_list("pk", flat=True)) == [pending.pk]


# -- data -----------------------------------------------------------------------------------
def test_search_finds_non_ascii_arguments(admin_client: Client) -> None:
    record = failed_task(args=["José Peña"])
    failed_task(args=["someone else"])
    html = admin_client.get(reverse("admin:coati_queue_taskresult_changelist"),
                            {"q": "José"}).content.decode()
    assert str(record.pk) in html and "1 result" in html


def test_a_failed_record_shows_the_class_it_raised(admin_client: Client) -> None:
    """The stored class path, not one parsed from the traceback's last line (which a
    multi-line message or an ``add_note()`` note breaks)."""
    task = failed_task(exception_class="example_project.payroll.rules.RuleBroken",
                       error="RuleBroken: line one\nline two",
                       traceback="Traceback (most recent call last):\n...\nline two\n")
    html = admin_client.get(reverse("admin:coati_queue_taskresult_change",
                                    args=[task.pk])).content.decode()
    assert "example_project.payroll.rules.RuleBroken" in html

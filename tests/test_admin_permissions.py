"""Admin, progress endpoint and metrics: who may see and do what, and nothing leaks.

Each view is checked for the three kinds of visitor that matter (anonymous,
staff without the permission, staff with it), plus escaping of task data and
masking of the Redis password on the overview.
"""

from __future__ import annotations

import datetime
from typing import Any

import pytest
from django.test import Client, override_settings
from django.urls import reverse
from django.utils import timezone

from coati_queue.models import (BatchStatus, ItemStatus, PayrollBatch, PayrollItem, TaskResult,
                                TaskStatus, WorkerHeartbeat)
from tests.conftest import logged_in, make_user, queue_settings

pytestmark = [pytest.mark.django_db, pytest.mark.usefixtures("private_queue")]

PASSWORD = "S3cretRedisPassw0rd"
TOKEN = "metrics-token-for-tests"


def make_batch(**fields: Any) -> PayrollBatch:
    now = timezone.now()
    values = {"planilla_id": "planilla_test", "periodo_inicio": datetime.date(2024, 1, 1),
              "periodo_fin": datetime.date(2024, 1, 15), "status": BatchStatus.RUNNING,
              "total": 10, "succeeded": 4, "failed": 1,
              "started_at": now - datetime.timedelta(seconds=10)}
    values.update(fields)
    return PayrollBatch.objects.create(**values)


def make_task(**fields: Any) -> TaskResult:
    values = {"task_name": "tests.add", "queue": "default", "backend": "huey",
              "status": TaskStatus.COMPLETED, "args": [1, 2], "kwargs": {}}
    values.update(fields)
    return TaskResult.objects.create(**values)


def batch_urls(batch: PayrollBatch) -> dict[str, str]:
    return {
        "change": reverse("admin:coati_queue_payrollbatch_change", args=[batch.pk]),
        "retry": reverse("admin:coati_queue_payrollbatch_retry", args=[batch.pk]),
        "cancel": reverse("admin:coati_queue_payrollbatch_cancel", args=[batch.pk]),
        "progress": reverse("coati_queue:batch-progress", args=[batch.pk]),
        "overview": reverse("admin:coati_queue_taskresult_overview"),
    }


# -- anonymous ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["change", "overview", "progress", "retry", "cancel"])
def test_anonymous_is_sent_to_the_login_page(name: str) -> None:
    url = batch_urls(make_batch())[name]
    response = Client().get(url)
    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))
    assert "next=" in response["Location"]


def test_anonymous_script_asking_for_json_gets_401() -> None:
    response = Client().get(batch_urls(make_batch())["progress"],
                            HTTP_ACCEPT="application/json")
    assert response.status_code == 401


# -- staff without the permission --------------------------------------------
@pytest.mark.parametrize("name", ["change", "overview", "progress", "retry", "cancel"])
def test_staff_without_view_permission_gets_403(django_user_model: Any, name: str) -> None:
    client = logged_in(make_user(django_user_model, "nobody"))
    assert client.get(batch_urls(make_batch())[name]).status_code == 403


def test_start_payroll_needs_add_permission(django_user_model: Any) -> None:
    client = logged_in(make_user(django_user_model, "viewer", "view_payrollbatch"))
    url = reverse("admin:coati_queue_payrollbatch_start")
    assert client.get(url).status_code == 403
    assert client.post(url, {"planilla_id": "x", "periodo_inicio": "2024-01-01",
                             "periodo_fin": "2024-01-15"}).status_code == 403
    assert not PayrollBatch.objects.exists()


# -- view-only staff ---------------------------------------------------------
def test_view_only_staff_sees_the_live_page_but_cannot_retry_or_cancel(
        django_user_model: Any) -> None:
    batch = make_batch(status=BatchStatus.COMPLETED_WITH_ERRORS, succeeded=9, failed=1)
    urls = batch_urls(batch)
    client = logged_in(make_user(django_user_model, "viewer", "view_payrollbatch",
                                 "view_taskresult"))
    page = client.get(urls["change"])
    assert page.status_code == 200
    html = page.content.decode()
    assert 'id="coati-batch-progress"' in html
    assert "coati_queue/batch_progress.js" in html
    assert 'id="coati-retry-link"' not in html  # no button without the change permission
    assert client.get(urls["progress"]).json()["failed"] == 1
    admin_progress = reverse("admin:coati_queue_payrollbatch_progress", args=[batch.pk])
    assert client.get(admin_progress).json() == client.get(urls["progress"]).json()
    for action in ("retry", "cancel"):
        assert client.get(urls[action]).status_code == 403
        assert client.post(urls[action]).status_code == 403
    assert client.post(urls["change"], {}).status_code == 403
    batch.refresh_from_db()
    assert batch.status == BatchStatus.COMPLETED_WITH_ERRORS and batch.failed == 1
    assert client.get(urls["overview"]).status_code == 200


def test_progress_endpoint_returns_the_model_progress(django_user_model: Any) -> None:
    batch = make_batch()
    client = logged_in(make_user(django_user_model, "viewer", "view_payrollbatch", staff=False))
    data = client.get(batch_urls(batch)["progress"]).json()
    assert data["id"] == batch.pk and data["status"] == "running"
    assert data["completed"] == 4 and data["failed"] == 1 and data["pending"] == 5
    assert data["progress_percentage"] == 50.0
    assert client.get(reverse("coati_queue:batch-progress", args=[999999])).status_code == 404


# -- staff with the change permission ----------------------------------------
def test_cancel_shows_a_confirmation_then_cancels_and_redirects(django_user_model: Any) -> None:
    batch = make_batch()
    urls = batch_urls(batch)
    client = logged_in(make_user(django_user_model, "operator", "view_payrollbatch",
                                 "change_payrollbatch"))
    assert 'id="coati-cancel-link"' in client.get(urls["change"]).content.decode()
    confirm = client.get(urls["cancel"])
    assert confirm.status_code == 200
    assert b"csrfmiddlewaretoken" in confirm.content
    batch.refresh_from_db()
    assert batch.status == BatchStatus.RUNNING  # GET changes nothing
    response = client.post(urls["cancel"], follow=True)
    assert response.redirect_chain[-1][0] == urls["change"]
    batch.refresh_from_db()
    assert batch.status == BatchStatus.CANCELLED
    assert "cancelled" in " ".join(str(m) for m in response.context["messages"]).lower()


def test_retry_requires_csrf_token(django_user_model: Any) -> None:
    batch = make_batch(status=BatchStatus.COMPLETED_WITH_ERRORS, succeeded=9, failed=1)
    user = make_user(django_user_model, "operator", "view_payrollbatch", "change_payrollbatch")
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    assert client.post(batch_urls(batch)["retry"]).status_code == 403


def test_failed_items_are_grouped_by_error_with_task_links(django_user_model: Any) -> None:
    batch = make_batch(status=BatchStatus.COMPLETED_WITH_ERRORS, total=5, succeeded=2, failed=3)
    task = make_task(task_name="coati.payroll.calculate_chunk")
    for employee, error in [("e1", "Employee inactive: e1"), ("e2", "Employee inactive: e2"),
                            ("e3", "<b>bad</b> data")]:
        PayrollItem.objects.create(batch=batch, employee_id=employee, status=ItemStatus.FAILED,
                                   error=error, task=task)
    PayrollItem.objects.create(batch=batch, employee_id="ok", status=ItemStatus.SUCCEEDED)
    client = logged_in(make_user(django_user_model, "operator", "view_payrollbatch",
                                 "change_payrollbatch", "view_taskresult"))
    html = client.get(batch_urls(batch)["change"]).content.decode()
    # "Employee inactive: e1" and "...: e2" are one kind of error; "<b>bad</b>" another.
    assert html.count('class="coati-failed-group"') == 2
    assert "Employee inactive: …" in html
    assert reverse("admin:coati_queue_taskresult_change", args=[task.pk]) in html
    for item in batch.items.filter(status=ItemStatus.FAILED):  # each opens its traceback
        assert reverse("admin:coati_queue_payrollitem_change", args=[item.pk]) in html
    assert "&lt;b&gt;bad&lt;/b&gt; data" in html and "<b>bad</b>" not in html
    assert 'id="coati-retry-link"' in html


def test_failed_item_page_shows_its_traceback_escaped(admin_client: Client) -> None:
    batch = make_batch(status=BatchStatus.COMPLETED_WITH_ERRORS, total=1, succeeded=0, failed=1)
    item = PayrollItem.objects.create(
        batch=batch, employee_id="e1", status=ItemStatus.FAILED, error="Invalid salary",
        traceback='Traceback (most recent call last):\n  File "<script>alert(1)</script>"\n'
                  "ValueError: Invalid salary")
    html = admin_client.get(reverse("admin:coati_queue_payrollitem_change",
                                    args=[item.pk])).content.decode()
    assert "ValueError: Invalid salary" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<script>alert(1)</script>" not in html


# -- start payroll -----------------------------------------------------------
def test_start_payroll_creates_a_batch_and_shows_errors_in_the_form(
        django_user_model: Any) -> None:
    user = make_user(django_user_model, "starter", "add_payrollbatch", "view_payrollbatch")
    client = logged_in(user)
    changelist = client.get(reverse("admin:coati_queue_payrollbatch_changelist"))
    url = reverse("admin:coati_queue_payrollbatch_start")
    assert url in changelist.content.decode()
    data = {"planilla_id": "planilla_x", "periodo_inicio": "2024-01-01",
            "periodo_fin": "2024-01-15"}
    response = client.post(url, data)
    batch = PayrollBatch.objects.get()
    assert response.status_code == 302
    assert response["Location"] == reverse("admin:coati_queue_payrollbatch_change",
                                           args=[batch.pk])
    assert batch.requested_by == user and batch.requested_by_name == "starter"
    again = client.post(url, data)  # same planilla and period while the first is active
    assert again.status_code == 200
    assert "already" in again.content.decode() and PayrollBatch.objects.count() == 1
    reversed_period = client.post(url, {**data, "periodo_inicio": "2024-02-01"})
    assert reversed_period.status_code == 200 and "errornote" in reversed_period.content.decode()


def test_add_button_leads_to_the_start_form(django_user_model: Any) -> None:
    client = logged_in(make_user(django_user_model, "starter", "add_payrollbatch"))
    response = client.get(reverse("admin:coati_queue_payrollbatch_add"))
    assert response["Location"] == reverse("admin:coati_queue_payrollbatch_start")


# -- task records ------------------------------------------------------------
def test_task_detail_escapes_the_traceback(admin_client: Client) -> None:
    record = make_task(status=TaskStatus.FAILED, error="boom <img src=x onerror=alert(1)>",
                       traceback='Traceback:\n  File "<script>alert(1)</script>"\nRuntimeError')
    html = admin_client.get(reverse("admin:coati_queue_taskresult_change",
                                    args=[record.pk])).content.decode()
    assert "<script>alert(1)</script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<img src=x" not in html
    assert 'name="_save"' not in html  # read-only: no save button


def test_task_records_cannot_be_added_or_edited(admin_client: Client) -> None:
    record = make_task()
    assert admin_client.get(reverse("admin:coati_queue_taskresult_add")).status_code == 403
    url = reverse("admin:coati_queue_taskresult_change", args=[record.pk])
    assert admin_client.post(url, {"status": "failed"}).status_code == 403
    record.refresh_from_db()
    assert record.status == TaskStatus.COMPLETED


def test_search_finds_tasks_by_their_arguments(admin_client: Client) -> None:
    wanted = make_task(kwargs={"employee": "emp_4242"})
    make_task(kwargs={"employee": "emp_1"})
    response = admin_client.get(reverse("admin:coati_queue_taskresult_changelist"),
                                {"q": "emp_4242"})
    assert list(response.context["cl"].result_list) == [wanted]
    by_id = admin_client.get(reverse("admin:coati_queue_taskresult_changelist"),
                             {"q": str(wanted.pk)})
    assert list(by_id.context["cl"].result_list) == [wanted]


def test_retry_action_creates_new_records_linked_to_the_originals(
        django_user_model: Any) -> None:
    failed = make_task(status=TaskStatus.FAILED, args=[2, 3], error="boom")
    running = make_task(status=TaskStatus.PROCESSING)
    changelist = reverse("admin:coati_queue_taskresult_changelist")
    viewer = logged_in(make_user(django_user_model, "viewer", "view_taskresult"))
    viewer.post(changelist, {"action": "retry_selected", "_selected_action": [failed.pk]})
    assert TaskResult.objects.count() == 2  # a view-only user has no such action
    client = logged_in(make_user(django_user_model, "operator", "view_taskresult",
                                 "change_taskresult"))
    client.post(changelist, {"action": "retry_selected",
                             "_selected_action": [failed.pk, running.pk]})
    retry = TaskResult.objects.get(retry_of=failed)
    assert retry.pk != failed.pk and retry.args == [2, 3]
    assert retry.status == TaskStatus.PENDING
    assert not TaskResult.objects.filter(retry_of=running).exists()
    failed.refresh_from_db()
    assert failed.status == TaskStatus.FAILED  # the original is kept as it was


def test_retry_all_failed_of_the_selected_names(admin_client: Client) -> None:
    failures = [make_task(status=TaskStatus.FAILED, args=[i, i]) for i in range(3)]
    already = make_task(status=TaskStatus.FAILED, args=[9, 9])
    make_task(retry_of=already)
    other = make_task(task_name="tests.noop", status=TaskStatus.FAILED, args=[])
    admin_client.post(reverse("admin:coati_queue_taskresult_changelist"),
                      {"action": "retry_all_failed_of_names",
                       "_selected_action": [failures[0].pk]})
    retried = set(TaskResult.objects.filter(retry_of__isnull=False)
                  .values_list("retry_of", flat=True))
    assert retried == {f.pk for f in failures} | {already.pk}
    assert not TaskResult.objects.filter(retry_of=other).exists()


# -- overview ----------------------------------------------------------------
def test_overview_lists_queues_workers_and_the_chart(admin_client: Client) -> None:
    now = timezone.now()
    WorkerHeartbeat.objects.create(worker_id="host:1:abc", hostname="host", pid=1,
                                   backend="huey", queues=["default"], last_seen=now)
    WorkerHeartbeat.objects.create(worker_id="host:2:old", hostname="host", pid=2,
                                   backend="huey", queues=["low"],
                                   last_seen=now - datetime.timedelta(hours=1))
    make_task(started_at=now - datetime.timedelta(seconds=3), finished_at=now)
    make_task(status=TaskStatus.FAILED, started_at=now, finished_at=now)
    html = admin_client.get(reverse("admin:coati_queue_taskresult_overview")).content.decode()
    assert "host:1:abc" in html and "host:2:old" in html
    assert "coati-status-alive" in html and "coati-status-lost" in html
    assert "<svg" in html and html.count('class="coati-bar-ok"') == 60
    assert 'data-queue="default"' in html
    app_index = admin_client.get(reverse("admin:app_list", args=["coati_queue"]))
    assert reverse("admin:coati_queue_taskresult_overview") in app_index.content.decode()


@pytest.mark.parametrize("backend", ["auto", "dramatiq"])
def test_overview_never_shows_the_redis_password(admin_client: Client, tmp_path: Any,
                                                 backend: str) -> None:
    url = f"redis://:{PASSWORD}@127.0.0.1:1/0"  # nothing listens on port 1
    with override_settings(COATI_QUEUE=queue_settings(tmp_path, BACKEND=backend, REDIS_URL=url,
                                                      REDIS_TIMEOUT=0.2)):
        response = admin_client.get(reverse("admin:coati_queue_taskresult_overview"))
    html = response.content.decode()
    assert response.status_code == 200
    assert PASSWORD not in html
    assert "***" in html


# -- metrics -----------------------------------------------------------------
def test_metrics_needs_staff_or_the_bearer_token(tmp_path: Any, django_user_model: Any) -> None:
    make_task(status=TaskStatus.FAILED, attempts=3, started_at=timezone.now(),
              finished_at=timezone.now(), duration_seconds=0.0)
    make_batch()
    url = reverse("coati_queue:metrics")
    with override_settings(COATI_QUEUE=queue_settings(tmp_path, METRICS_TOKEN=TOKEN)):
        assert Client().get(url).status_code == 403
        assert Client().get(url, HTTP_AUTHORIZATION="Bearer wrong").status_code == 403
        assert Client().get(url, HTTP_AUTHORIZATION=TOKEN).status_code == 403
        non_staff = logged_in(make_user(django_user_model, "plain", staff=False))
        assert non_staff.get(url).status_code == 403
        response = Client().get(url, HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
        assert response.status_code == 200
        assert response["Content-Type"].startswith("text/plain")
        text = response.content.decode()
        assert 'coati_tasks_total{status="failed",task="tests.add"} 1.0' in text
        assert 'coati_tasks_total{status="enqueued",task="tests.add"} 1.0' in text
        assert 'coati_task_retries_total{task="tests.add"} 2.0' in text
        assert 'coati_task_duration_seconds_count{task="tests.add"} 1.0' in text
        assert 'coati_queue_depth{queue="default"} 0.0' in text
        assert "coati_workers_alive 0.0" in text and "coati_batches_running 1.0" in text
        assert "coati_batch_progress_ratio{batch=" in text
        staff = logged_in(make_user(django_user_model, "staff"))
        assert staff.get(url).status_code == 200


def test_metrics_without_a_configured_token_refuses_every_bearer(tmp_path: Any) -> None:
    with override_settings(COATI_QUEUE=queue_settings(tmp_path, METRICS_TOKEN=None)):
        response = Client().get(reverse("coati_queue:metrics"), HTTP_AUTHORIZATION="Bearer ")
    assert response.status_code == 403



# -- translations ------------------------------------------------------------
def test_the_admin_pages_speak_spanish(admin_client: Client) -> None:
    batch = make_batch(status=BatchStatus.COMPLETED_WITH_ERRORS, succeeded=9, failed=1)
    html = admin_client.get(batch_urls(batch)["change"],
                            HTTP_ACCEPT_LANGUAGE="es").content.decode()
    assert "Progreso" in html and "Reintentar elementos fallidos" in html
    assert "10 de 10 (100,0%)" in html and "lote de planilla</h1>" in html
    assert '"Completado con errores"' in html  # the poller's status labels
    listing = admin_client.get(reverse("admin:coati_queue_payrollbatch_changelist"),
                               HTTP_ACCEPT_LANGUAGE="es").content.decode()
    assert "Iniciar planilla" in listing and "Lotes de planilla" in listing
    overview = admin_client.get(batch_urls(batch)["overview"],
                                HTTP_ACCEPT_LANGUAGE="es").content.decode()
    assert "Resumen de colas" in overview and "Última hora" in overview
    running = make_batch(planilla_id="planilla_es")  # a second start names the running one
    refused = admin_client.post(reverse("admin:coati_queue_payrollbatch_start"), {
        "planilla_id": "planilla_es", "periodo_inicio": "2024-01-01",
        "periodo_fin": "2024-01-15"}, HTTP_ACCEPT_LANGUAGE="es").content.decode()
    assert f"en estado en ejecución: lote #{running.pk}" in refused

"""Hardening: the Huey directory, the DEBUG page, metric labels, admin retries, the
overview's batches, retry jitter. Real directories and modes, a real Django error
page, real requests through the test client, real Huey files.
"""

from __future__ import annotations

import datetime
import os
import random
import statistics
import sys
from typing import Any, Callable

import pytest
from django.test import Client, RequestFactory, override_settings
from django.urls import reverse
from django.utils import timezone
from django.views.debug import ExceptionReporter, SafeExceptionReporterFilter
from prometheus_client.parser import text_string_to_metric_families

from coati_queue import selection
from coati_queue.backends.huey_storage import QueueFileStorage
from coati_queue.conf import get_settings
from coati_queue.core.exceptions import StorageUnavailable
from coati_queue.core.jobs import Job
from coati_queue.models import BatchStatus, PayrollBatch, TaskResult, TaskStatus
from tests.conftest import free_port, logged_in, make_user, queue_settings

PASSWORD = "Hardening-Secret-91c2"
TOKEN = "metrics-token-Hardening-4e1b"


# -- the Huey directory ------------------------------------------------------------------------
def refused(caplog: Any) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")


@pytest.mark.parametrize("layout, reason", [
    ("world-writable", "writable by other users (mode 0777)"),
    ("group-writable", "writable by other users (mode 0775)"),
    ("open-parent", "is not safe: it is writable by other users (mode 0777) without the sticky"),
    ("foreign-sticky-parent", "owned by uid 12345, neither this user"),
    ("lock-symlink", "holds a symlink"),
])
def test_unsafe_huey_directories_are_refused(queue_env, tmp_path, caplog, layout, reason):
    import logging

    base = tmp_path / "base"
    base.mkdir(mode=0o700)
    wanted = base / "huey"
    wanted.mkdir(mode=0o700)
    if layout == "world-writable":
        os.chmod(wanted, 0o777)
    elif layout == "group-writable":
        os.chmod(wanted, 0o775)
    elif layout == "open-parent":
        os.chmod(base, 0o777)
    elif layout == "foreign-sticky-parent":
        os.chmod(base, 0o1777)
        os.chown(base, 12345, 12345)
    elif layout == "lock-symlink":
        victim = tmp_path / "victim"
        victim.write_text("precious")
        (wanted / ".lock").symlink_to(victim)
    queue_env(COATI_QUEUE_PATH=str(wanted))
    with caplog.at_level(logging.ERROR, logger="coati_queue"):
        driver = selection.get_queue_driver()
    assert driver.path == selection.SYSTEM_PATH  # the next candidate
    assert str(wanted) in refused(caplog) and reason in refused(caplog)
    assert os.listdir(wanted) in ([], [".lock"])  # nothing written there


def test_a_symlinked_parent_is_checked_where_it_points(queue_env, tmp_path):
    """``/srv/queue -> /shared/open/q``: the folders the link leads through count too."""
    safe, open_ = tmp_path / "safe", tmp_path / "open"
    (safe / "real").mkdir(parents=True, mode=0o700)
    (open_ / "real").mkdir(parents=True, mode=0o700)
    os.chmod(open_, 0o777)
    (tmp_path / "to-safe").symlink_to(safe / "real", target_is_directory=True)
    (tmp_path / "to-open").symlink_to(open_ / "real", target_is_directory=True)
    assert selection.check_directory(str(tmp_path / "to-safe" / "huey")) is None
    problem = selection.check_directory(str(tmp_path / "to-open" / "huey"))
    assert problem and f"its parent {open_} is not safe" in problem
    assert not (open_ / "real" / "huey").exists()  # refused before anything was created


def test_a_sticky_parent_owned_by_root_is_accepted_like_tmp(queue_env, tmp_path):
    base = tmp_path / "shared"
    base.mkdir()
    os.chmod(base, 0o1777)  # /tmp: anyone may create, only owners rename or delete
    queue_env(COATI_QUEUE_PATH=str(base / "coati_queue"))
    driver = selection.get_queue_driver()
    assert driver.path == str(base / "coati_queue")
    info = os.lstat(driver.path)
    assert info.st_uid == os.getuid() and info.st_mode & 0o777 == 0o700


def test_missing_parents_are_created_0700_whatever_the_umask(queue_env, tmp_path):
    wanted = tmp_path / "a" / "b" / "queue"
    old = os.umask(0o002)
    try:
        queue_env(COATI_QUEUE_PATH=str(wanted))
        assert selection.get_queue_driver().path == str(wanted)
    finally:
        os.umask(old)
    for folder in (tmp_path / "a", tmp_path / "a" / "b", wanted):
        assert os.lstat(folder).st_mode & 0o777 == 0o700


def test_the_directory_is_checked_again_when_a_driver_is_built(tmp_path):
    """Chosen while safe, then opened to everyone: building on it is refused."""
    path = tmp_path / "huey"
    chosen = selection.Selection("huey", "test", path=str(path))
    assert selection.check_directory(str(path)) is None
    os.chmod(path, 0o777)
    with pytest.raises(StorageUnavailable, match="writable by other users"):
        selection.build_driver(chosen, get_settings())
    os.chmod(path, 0o700)
    os.rename(path, tmp_path / "moved")
    with pytest.raises(StorageUnavailable, match="does not exist"):
        selection.build_driver(chosen, get_settings())


def test_a_driver_opens_its_storage_only_on_a_directory_that_is_still_safe(tmp_path):
    path = tmp_path / "huey"
    chosen = selection.Selection("huey", "test", path=str(path))
    assert selection.check_directory(str(path)) is None
    driver = selection.build_driver(chosen, get_settings())  # storage is built lazily
    os.chmod(path, 0o777)
    with pytest.raises(StorageUnavailable):
        driver.huey.storage  # noqa: B018


def test_a_planted_huey_lock_symlink_does_not_truncate_its_target(tmp_path):
    path = tmp_path / "huey"
    path.mkdir(mode=0o700)
    storage = QueueFileStorage("coati", str(path))
    victim = tmp_path / "victim.txt"
    victim.write_text("payroll export")
    (path / ".lock").symlink_to(victim)
    # An older release's delayed job: reading the schedule takes Huey's own lock.
    (path / "schedule" / ("%012x" % 1)).write_bytes(b'{"huey": {"priority": 0, "args": []}}')
    try:
        storage.read_schedule(datetime.datetime(2100, 1, 1))
    except OSError:
        pass  # refusing the symlink is fine; following it is not
    assert victim.read_text() == "payroll export"


def test_planted_giveback_and_reservation_lock_symlinks_are_not_followed(tmp_path):
    path = tmp_path / "huey"
    path.mkdir(mode=0o700)
    storage = QueueFileStorage("coati", str(path))
    victim = tmp_path / "victim.txt"
    victim.write_text("payroll export")
    dead_token = "4242-0123456789abcdef"
    (path / "reserved" / f"{dead_token}.lock").symlink_to(victim)
    (path / "reserved" / dead_token).mkdir(mode=0o700)
    assert storage.reclaim_lost() == 0  # skipped, with a warning
    (path / "giveback.lock").symlink_to(victim)
    with pytest.raises(OSError):
        storage.present_job_ids()  # takes the give-back lock: O_NOFOLLOW refuses the link
    assert victim.read_text() == "payroll export"
    assert os.path.islink(path / "reserved" / f"{dead_token}.lock")


def test_dramatiq_workers_do_not_drain_an_unsafe_fallback_directory(tmp_path):
    from coati_queue.fallback import fallback_directories

    planted = tmp_path / "planted"
    planted.mkdir()
    os.chmod(planted, 0o777)  # made by anyone: its jobs are anyone's
    with override_settings(COATI_QUEUE=queue_settings(tmp_path, PATH=str(planted))):
        assert str(planted) not in fallback_directories(get_settings())


# -- the Redis password on Django's DEBUG page ------------------------------------------------
def debug_page(call: Callable[[], Any], request: Any) -> str:
    """Django's technical 500 page (HTML and text) for what ``call`` raises."""
    try:
        call()
    except Exception:  # noqa: BLE001
        reporter = ExceptionReporter(request, *sys.exc_info())
        return reporter.get_traceback_html() + reporter.get_traceback_text()
    raise AssertionError("expected an exception")


@pytest.mark.parametrize("scenario", ["auto-falls-back-and-no-directory", "driver-fails"])
def test_the_debug_page_never_shows_the_redis_password(tmp_path, monkeypatch, queue_env,
                                                       scenario):
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    extra: dict[str, Any] = {"REDIS_URL": url, "METRICS_TOKEN": TOKEN, "REDIS_TIMEOUT": 0.2}
    if scenario == "driver-fails":
        extra.update(BACKEND="dramatiq", MIDDLEWARE=["tests.no_such_module.Middleware"])
    else:  # Redis down and no usable Huey directory: raised inside choose_backend
        blocker = tmp_path / "a-file"
        blocker.write_text("x")
        for name in ("SYSTEM_PATH", "USER_PATH", "LOCAL_PATH"):
            monkeypatch.setattr(selection, name, str(blocker / name.lower()))
        monkeypatch.setattr(selection.tempfile, "gettempdir", lambda: str(blocker))
        extra.update(BACKEND="auto", PATH=str(blocker / "wanted"))
    queue_env(REDIS_URL=url)  # as users set it: in the environment, seen in request.META
    request = RequestFactory().get("/queue/", REDIS_URL=url)
    with override_settings(DEBUG=True, REDIS_URL=url,
                           COATI_QUEUE=queue_settings(tmp_path, **extra)):
        page = debug_page(selection.get_queue_driver, request)
    assert "Traceback" in page and "Local vars" in page  # the page a developer sees
    assert "get_queue_driver" in page
    assert PASSWORD not in page
    assert TOKEN not in page
    assert "REDIS_URL" in page and SafeExceptionReporterFilter.cleansed_substitute in page


def test_error_pages_hide_redis_url_settings_without_any_setting():
    cleanse = SafeExceptionReporterFilter().cleanse_setting
    url = f"redis://:{PASSWORD}@localhost/0"
    assert cleanse("REDIS_URL", url) == SafeExceptionReporterFilter.cleansed_substitute
    cleansed = cleanse("COATI_QUEUE", {"REDIS_URL": url, "METRICS_TOKEN": TOKEN, "QUEUES": ["a"]})
    assert PASSWORD not in str(cleansed) and TOKEN not in str(cleansed)
    assert cleansed["QUEUES"] == ["a"]
    assert cleanse("STATIC_URL", "/static/") == "/static/"  # other *_URL settings stay visible


def test_the_selection_and_the_url_object_mask_the_password_in_repr():
    from coati_queue.redis_url import RedisURL

    url = f"redis://user:{PASSWORD}@localhost/0?password={PASSWORD}"
    chosen = selection.Selection("dramatiq", "test", redis_url=url)
    assert PASSWORD not in repr(chosen) and "***" in repr(chosen)
    assert isinstance(chosen.redis_url, RedisURL) and chosen.redis_url == url
    assert PASSWORD not in repr([chosen.redis_url]) and PASSWORD not in f"{chosen.redis_url!r}"
    assert str(chosen.redis_url) == url  # redis-py still gets the real URL


# -- metric labels are bounded ----------------------------------------------------------------
@pytest.mark.django_db
def test_unregistered_task_names_share_one_metric_label(tmp_path):
    now = timezone.now()
    planted = [f"evil.name_{index}" for index in range(50)]
    for name in planted + ["tests.add"]:
        TaskResult.objects.create(task_name=name, queue="default", backend="huey",
                                  status=TaskStatus.FAILED, attempts=2, started_at=now,
                                  finished_at=now, duration_seconds=0.1)
    with override_settings(COATI_QUEUE=queue_settings(tmp_path, METRICS_TOKEN=TOKEN)):
        response = Client().get(reverse("coati_queue:metrics"),
                                HTTP_AUTHORIZATION=f"Bearer {TOKEN}")
    assert response.status_code == 200
    labels: dict[str, set[str]] = {}
    samples = {}
    for family in text_string_to_metric_families(response.content.decode()):
        for sample in family.samples:
            if "task" in sample.labels:
                labels.setdefault(family.name, set()).add(sample.labels["task"])
                key = (sample.name, sample.labels["task"], sample.labels.get("status", ""))
                samples[key] = sample.value
    assert labels["coati_tasks"] == {"tests.add", "<unregistered>"}
    assert labels["coati_task_retries"] == {"tests.add", "<unregistered>"}
    assert labels["coati_task_duration_seconds"] == {"tests.add", "<unregistered>"}
    assert samples[("coati_tasks_total", "<unregistered>", "failed")] == 50
    assert samples[("coati_task_retries_total", "<unregistered>", "")] == 50
    assert samples[("coati_task_duration_seconds_count", "<unregistered>", "")] == 50
    assert samples[("coati_tasks_total", "tests.add", "failed")] == 1


# -- admin retries are idempotent ------------------------------------------------------------
def failed_task(**fields: Any) -> TaskResult:
    values = {"task_name": "tests.add", "queue": "default", "backend": "huey",
              "status": TaskStatus.FAILED, "args": [1, 2], "kwargs": {}}
    return TaskResult.objects.create(**{**values, **fields})


@pytest.mark.django_db
def test_a_double_post_of_retry_enqueues_once(admin_client: Client, tmp_path: Any) -> None:
    original = failed_task()
    form = {"action": "retry_selected", "_selected_action": [str(original.pk)]}
    url = reverse("admin:coati_queue_taskresult_changelist")
    with override_settings(COATI_QUEUE=queue_settings(tmp_path)):
        first = admin_client.post(url, form, follow=True).content.decode()
        second = admin_client.post(url, form, follow=True).content.decode()
        queued = selection.get_queue_driver().queue_depths()["default"]["queued"]
    (retry,) = TaskResult.objects.filter(retry_of=original)
    assert queued == 1
    assert "1 task was re-enqueued" in first
    assert "was already retried as" in second and str(retry.pk) in second
    assert "re-enqueued" not in second


@pytest.mark.django_db
def test_retrying_several_records_skips_the_ones_already_retried(admin_client: Client,
                                                                 tmp_path: Any) -> None:
    done = failed_task()
    failed_task(retry_of=done, status=TaskStatus.FAILED)  # retried once already, failed again
    fresh = failed_task()
    with override_settings(COATI_QUEUE=queue_settings(tmp_path)):
        html = admin_client.post(reverse("admin:coati_queue_taskresult_changelist"), {
            "action": "retry_selected", "_selected_action": [str(done.pk), str(fresh.pk)]},
            follow=True).content.decode()
    assert TaskResult.objects.filter(retry_of=done).count() == 1
    assert TaskResult.objects.filter(retry_of=fresh).count() == 1
    assert "1 task was re-enqueued" in html and "already retried" in html


# -- the overview lists only batches the user may open -----------------------------------------
@pytest.mark.django_db
def test_the_overview_lists_only_batches_the_user_may_view(django_user_model: Any,
                                                           tmp_path: Any) -> None:
    batch = PayrollBatch.objects.create(
        planilla_id="planilla_secreta", periodo_inicio=datetime.date(2024, 1, 1),
        periodo_fin=datetime.date(2024, 1, 15), status=BatchStatus.RUNNING, total=10)
    batch_url = reverse("admin:coati_queue_payrollbatch_change", args=[batch.pk])
    overview = reverse("admin:coati_queue_taskresult_overview")
    tasks_only = logged_in(make_user(django_user_model, "ops", "view_taskresult"))
    both = logged_in(make_user(django_user_model, "payroll", "view_taskresult",
                               "view_payrollbatch"))
    with override_settings(COATI_QUEUE=queue_settings(tmp_path)):
        hidden = tasks_only.get(overview)
        shown = both.get(overview)
    assert hidden.status_code == shown.status_code == 200
    assert "planilla_secreta" not in hidden.content.decode()
    assert batch_url not in hidden.content.decode()
    assert "coati-active-batches" not in hidden.content.decode()
    assert "planilla_secreta" in shown.content.decode() and batch_url in shown.content.decode()
    assert tasks_only.get(batch_url).status_code == 403  # what the list would have linked to


# -- stray files in the Huey directory ---------------------------------------------------------
@pytest.mark.django_db(transaction=True)  # sends happen at commit
def test_stray_files_do_not_break_the_overview_or_metrics(admin_client: Client,
                                                          tmp_path: Any) -> None:
    with override_settings(COATI_QUEUE=queue_settings(tmp_path)):
        driver = selection.get_queue_driver()
        driver.enqueue("tests.add", 1, 2)
        driver.enqueue("tests.add", 3, 4, delay=3600)
        root = driver.path
        for name in ("queue/.fffd-000000000000-0000000000-1.swp", "queue/4913",
                     "queue/fffd-notes~", "schedule/.notes.swp", "reserved/.swp"):
            with open(os.path.join(root, name), "wb") as handle:
                handle.write(b"\x00 an editor's swap file")
        os.mkdir(os.path.join(root, "queue", "fffd-a-folder"))
        overview = admin_client.get(reverse("admin:coati_queue_taskresult_overview"))
        metrics = admin_client.get(reverse("coati_queue:metrics"))
    assert overview.status_code == 200
    assert 'id="coati-broker-error"' not in overview.content.decode()
    assert metrics.status_code == 200
    text = metrics.content.decode()
    assert 'coati_queue_depth{queue="default"} 1.0' in text
    assert 'coati_queue_delayed{queue="default"} 1.0' in text
    assert "coati_broker_up 1.0" in text


# -- retry jitter, the first retry included --------------------------------------------------
def test_every_retry_delay_is_jittered_the_first_included():
    rng = random.Random(20240115)
    job = Job(task="tests.add", min_backoff=10_000, max_backoff=60_000, attempt=1)
    first = [job.backoff_ms(rng) for _ in range(2000)]
    assert all(5_000 <= delay <= 10_000 for delay in first)
    assert min(first) < 5_300 and max(first) > 9_700  # spread over the whole range
    assert len(set(first)) > 1_000
    assert 7_300 < statistics.mean(first) < 7_700  # uniform: the middle on average

    third = [Job(task="tests.add", min_backoff=10_000, max_backoff=60_000,
                 attempt=3).backoff_ms(rng) for _ in range(500)]
    assert all(20_000 <= delay <= 40_000 for delay in third) and len(set(third)) > 100

    capped = [Job(task="tests.add", min_backoff=10_000, max_backoff=60_000,
                  attempt=30).backoff_ms(rng) for _ in range(500)]
    assert all(30_000 <= delay <= 60_000 for delay in capped) and max(capped) > 58_000

    again = random.Random(20240115)
    assert [job.backoff_ms(again) for _ in range(2000)] == first  # seeded: reproducible


"""The admin as a person uses it: headless Chromium, a live server and real workers.

One story, end to end: log in, start a payroll of 200 employees from the
"Start payroll" page, watch the live batch page rise to 100% without a reload
while real ``runworkers`` processes compute it, read the failed items, fix the
data, retry the failed items, see the batch complete, and find a running
worker on the queue overview. Screenshots go to ``test-artifacts/``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

import pytest
from django.core.management import call_command

from coati_queue.models import BatchStatus, ItemStatus, PayrollBatch, WorkerHeartbeat
from tests.conftest import REPO_ROOT, worker_command, worker_env, worker_pids

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = REPO_ROOT / "test-artifacts"
PLANILLA = "planilla_browser"
BROKEN_EMPLOYEES = 3
CHUNK_SIZE = 10  # ~20 chunks of a paced hook: a few seconds, several polls of the page
PACED_HOOK = "tests.testapp.payroll_hooks.paced_calculate_many"

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def require_chromium() -> None:
    """Skip without Chromium locally; on CI a missing browser is a failure, not a skip."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(path)]
    if missing:
        message = f"{', '.join(missing)} not installed (apt-get install chromium chromium-driver)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def browser() -> Any:
    """Headless Chromium through the system chromedriver: Selenium Manager never runs."""
    require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1400,1100", "--lang=en-US"):
        options.add_argument(arg)
    with tempfile.TemporaryDirectory(prefix="coati-chromium-") as profile:
        options.add_argument(f"--user-data-dir={profile}")
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        driver.set_page_load_timeout(60)
        try:
            yield driver
        finally:
            driver.quit()


def wait_until(condition: Callable[[], Any], timeout: float, what: str,
               interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def screenshot(driver: Any, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"admin_{name}.png"
    driver.save_screenshot(str(path))
    return path


def text_of(driver: Any, element_id: str) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id).text


def start_burst_worker() -> subprocess.Popen:
    return subprocess.Popen(worker_command("huey", threads=2), cwd=REPO_ROOT,
                            env=worker_env({"COATI_TEST_CALCULATE_MANY": PACED_HOOK}),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def watch_progress(driver: Any, worker: subprocess.Popen, name: str,
                   final_status: str) -> list[str]:
    """Read the panel while the worker runs; returns every distinct progress text seen."""
    seen: list[str] = []
    mid_shot = False
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        text = text_of(driver, "coati-progress-text")
        if not seen or seen[-1] != text:
            seen.append(text)
        if not mid_shot and "(0.0%)" not in text and "(100.0%)" not in text:
            screenshot(driver, f"{name}_mid")
            mid_shot = True
        if driver.find_element("id", "coati-batch-progress").get_attribute(
                "data-status") == final_status and "(100.0%)" in text:
            break
        time.sleep(0.1)
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 0, output
    assert seen and "(100.0%)" in seen[-1], (seen, output)
    screenshot(driver, f"{name}_end")
    return seen


def log_in(driver: Any, base: str, username: str, password: str, next_url: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(f"{base}/admin/login/?next={next_url}")
    driver.find_element(By.NAME, "username").send_keys(username)
    driver.find_element(By.NAME, "password").send_keys(password)
    driver.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    # The login page's own URL holds next_url (?next=...): wait for the path itself.
    wait_until(lambda: urlsplit(driver.current_url).path == next_url, 30,
               "the page after login")


def test_live_batch_page_retry_and_overview(browser: Any, live_server: Any, queue_env: Any,
                                            huey_path: str, django_user_model: Any,
                                            settings: Any) -> None:
    from selenium.webdriver.common.by import By

    from coati_queue.payroll import process_payroll_parallel
    from example_project.payroll.models import Employee

    queue_env(COATI_QUEUE_BACKEND="huey", COATI_QUEUE_PATH=huey_path)
    # Chunks are cut where the batch is fanned out: here, and in the live server's retry.
    settings.COATI_QUEUE = {**settings.COATI_QUEUE,
                            "PAYROLL": {**settings.COATI_QUEUE["PAYROLL"], "CHUNK_SIZE": CHUNK_SIZE}}
    django_user_model.objects.create_superuser("boss", "boss@example.com", "pw-boss-123")
    call_command("seed_demo", employees=200, seed=1, planilla=PLANILLA, verbosity=0)
    base = live_server.url
    changelist = "/admin/coati_queue/payrollbatch/"

    # Start a payroll from the admin.
    log_in(browser, base, "boss", "pw-boss-123", changelist)
    browser.find_element(By.ID, "coati-start-payroll").click()
    browser.find_element(By.NAME, "planilla_id").send_keys(PLANILLA)
    browser.find_element(By.NAME, "periodo_inicio").send_keys("2024-01-01")
    browser.find_element(By.NAME, "periodo_fin").send_keys("2024-01-15")
    screenshot(browser, "start_form")
    browser.find_element(By.ID, "coati-start-submit").click()
    batch = wait_until(lambda: PayrollBatch.objects.first(), 30, "the new batch")
    change_url = f"/admin/coati_queue/payrollbatch/{batch.pk}/change/"
    wait_until(lambda: change_url in browser.current_url, 30, "the live batch page")
    assert browser.find_element(By.ID, "coati-batch-progress").get_attribute("data-active") == "1"

    # Fan the batch out here (the same function the worker task runs), so the employee
    # list is fixed before three employees are broken: their failure is then certain.
    process_payroll_parallel(planilla_id=PLANILLA, periodo_inicio="2024-01-01",
                             periodo_fin="2024-01-15", usuario="boss", batch_id=batch.pk)
    batch.refresh_from_db()
    assert batch.status == BatchStatus.RUNNING and batch.total > 150
    broken = list(batch.items.order_by("employee_id")
                  .values_list("employee_id", flat=True)[:BROKEN_EMPLOYEES])
    Employee.objects.filter(code__in=broken).update(active=False)

    # Real workers compute it; the page follows without a reload.
    browser.execute_script("window.__coatiMarker = 1;")
    seen = watch_progress(browser, start_burst_worker(), "run",
                          BatchStatus.COMPLETED_WITH_ERRORS)
    assert browser.execute_script("return window.__coatiMarker;") == 1, "the page reloaded"
    assert int(browser.find_element(By.ID, "coati-batch-progress").get_attribute(
        "data-polls")) >= 1
    between = [text for text in seen if "(0.0%)" not in text and "(100.0%)" not in text]
    assert between, f"no value between 0% and 100% was shown: {seen}"
    assert text_of(browser, "coati-progress-failed") == str(BROKEN_EMPLOYEES)
    assert browser.find_element(By.CSS_SELECTOR, ".field-total .readonly").text == str(
        batch.total)  # the read-only rows follow the panel too
    assert not browser.find_elements(By.ID, "coati-cancel-link")  # nothing left to cancel
    print("progress texts seen during the run:", seen)

    # The failures, grouped by error: each employee opens its traceback, each task link
    # its task record.
    browser.refresh()
    groups = browser.find_element(By.ID, "coati-failed-groups")
    assert all(code in groups.text for code in broken)
    assert "Employee inactive" in groups.text
    browser.execute_script("arguments[0].scrollIntoView();", groups)
    screenshot(browser, "failed_groups")
    assert len(groups.find_elements(By.CSS_SELECTOR, "a.coati-item-task")) == BROKEN_EMPLOYEES
    first = browser.find_elements(By.CSS_SELECTOR, "a.coati-item")[0]
    assert first.text == broken[0]
    first.click()
    wait_until(lambda: "/admin/coati_queue/payrollitem/" in browser.current_url, 30,
               "the failed item's page")
    trace = browser.find_element(By.CSS_SELECTOR, ".field-traceback_block pre").text
    assert trace.startswith("Traceback (most recent call last):"), trace
    assert f"LookupError: Employee inactive: {broken[0]}" in trace
    assert "example_project/payroll/services.py" in trace  # where the rule raised it
    screenshot(browser, "failed_item_traceback")
    browser.find_element(By.CSS_SELECTOR, ".field-task_link a").click()
    wait_until(lambda: "/admin/coati_queue/taskresult/" in browser.current_url, 30,
               "the item's task record")
    assert "coati.payroll.calculate_chunk" in browser.page_source
    assert browser.find_elements(By.CSS_SELECTOR, ".field-traceback_display")
    screenshot(browser, "task_record")

    # Fix the data, retry the failed items through the confirmation page.
    Employee.objects.filter(code__in=broken).update(active=True)
    browser.get(base + change_url)
    browser.find_element(By.ID, "coati-retry-link").click()
    assert "retry" in browser.current_url
    browser.find_element(By.ID, "coati-confirm-submit").click()
    wait_until(lambda: browser.current_url.endswith(change_url), 30, "back on the batch page")
    assert str(BROKEN_EMPLOYEES) in browser.find_element(By.CSS_SELECTOR, ".messagelist").text
    batch.refresh_from_db()
    assert batch.status == BatchStatus.RUNNING and batch.failed == 0
    browser.execute_script("window.__coatiMarker = 2;")
    watch_progress(browser, start_burst_worker(), "retry", BatchStatus.COMPLETED)
    assert browser.execute_script("return window.__coatiMarker;") == 2, "the page reloaded"
    batch.refresh_from_db()
    assert batch.status == BatchStatus.COMPLETED and batch.succeeded == batch.total
    assert not batch.items.exclude(status=ItemStatus.SUCCEEDED).exists()
    browser.get(base + changelist)
    assert "100.0%" in browser.find_element(By.CSS_SELECTOR, "#result_list .coati-progress").text
    screenshot(browser, "changelist")
    browser.execute_script("localStorage.setItem('theme', 'dark');")  # the admin's toggle
    browser.get(base + change_url)
    screenshot(browser, "batch_dark")
    browser.execute_script("localStorage.setItem('theme', 'auto');")
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"
              and "favicon" not in entry["message"]]
    assert not errors, errors

    # A long-running worker shows up alive on the queue overview.
    worker = subprocess.Popen(worker_command("huey", burst=False, threads=2), cwd=REPO_ROOT,
                              env=worker_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        beat = wait_until(lambda: WorkerHeartbeat.objects.filter(
            pid__in=worker_pids(worker.pid), stopped_at__isnull=True).first(), 60,
            "the worker's heartbeat")
        browser.get(base + "/admin/coati_queue/taskresult/overview/")
        workers = browser.find_element(By.ID, "coati-workers").text
        assert beat.worker_id in workers and "alive" in workers
        assert "huey" in text_of(browser, "coati-backend-name")
        assert browser.find_elements(By.CSS_SELECTOR, "#coati-throughput svg rect.coati-bar-ok")
        screenshot(browser, "overview")
    finally:
        worker.send_signal(signal.SIGTERM)
        output, _ = worker.communicate(timeout=60)
    assert worker.returncode == 0, output

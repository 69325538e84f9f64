"""The multi-host test's hands inside the services namespace (tests/test_multihost.py).

The test process lives outside the namespaces and cannot reach their
addresses, so it runs ``python -m tests.multihost_driver <command>`` on the
services host; each command prints one JSON object.

* ``prepare N``: migrate, seed N employees, print the active ones.
* ``start``: start the payroll batch, print its id.
* ``progress ID``: items done, and which host ran the last chunk of each.
* ``cut-point ID``: waits (polling in-process, so the test can act within
  milliseconds) until both hosts have paid employees and 10 %..60 % is done.
* ``verify ID``: the batch, its payroll lines and the queue overview's hosts.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import sys
from collections import Counter
from typing import Any

PLANILLA = "multihost"
START, END = datetime.date(2024, 1, 1), datetime.date(2024, 1, 15)


def prepare(employees: str) -> dict[str, Any]:
    from django.core.management import call_command

    from example_project.payroll import services

    call_command("migrate", verbosity=0, interactive=False)
    call_command("seed_demo", employees=int(employees), seed=7, planilla=PLANILLA,
                 company="Multi-host S.A.", stdout=io.StringIO())
    return {"active": len(services.active_employee_ids(PLANILLA, START, END))}


def start() -> dict[str, Any]:
    from coati_queue.payroll import start_payroll_batch

    batch = start_payroll_batch(PLANILLA, START.isoformat(), END.isoformat(), usuario="multihost")
    return {"batch": batch.pk}


def _hosts_of_items(batch_id: int) -> dict[str, int]:
    from coati_queue.models import PayrollItem

    workers = PayrollItem.objects.filter(batch_id=batch_id, status="succeeded").values_list(
        "task__worker_id", flat=True)
    return dict(Counter((worker or "?").split(":", 1)[0] for worker in workers))


def progress(batch_id: str) -> dict[str, Any]:
    from coati_queue.models import PayrollBatch

    batch = PayrollBatch.objects.get(pk=batch_id)
    return {"status": batch.status, "total": batch.total,
            "done": batch.succeeded + batch.failed, "by_host": _hosts_of_items(batch.pk)}


def cut_point(batch_id: str, deadline: str = "120") -> dict[str, Any]:
    import time

    ends = time.monotonic() + float(deadline)
    while True:
        state = progress(batch_id)
        if state["done"] > state["total"] * 0.6:
            return {**state, "overshot": True}
        if state["done"] >= state["total"] * 0.1 and len(state["by_host"]) >= 2:
            return {**state, "overshot": False}
        if time.monotonic() > ends:
            return {**state, "timed_out": True}
        time.sleep(0.05)


def verify(batch_id: str) -> dict[str, Any]:
    from django.contrib.auth import get_user_model
    from django.db.models import Count
    from django.test import Client
    from django.test.utils import setup_test_environment

    from coati_queue.models import PayrollBatch
    from example_project.payroll.models import PayrollLine

    batch = PayrollBatch.objects.get(pk=batch_id)
    lines = PayrollLine.objects.filter(batch=batch)
    repeated = list(lines.values("employee").annotate(n=Count("id")).filter(n__gt=1)
                    .values_list("employee", flat=True))
    admin, _ = get_user_model().objects.get_or_create(
        username="multihost", defaults={"is_staff": True, "is_superuser": True})
    setup_test_environment()  # so the response carries the template context
    client = Client()
    client.force_login(admin)
    page = client.get("/admin/coati_queue/taskresult/overview/")
    return {
        "status": batch.status, "total": batch.total, "succeeded": batch.succeeded,
        "failed": batch.failed, "lines": lines.count(),
        "employees": lines.values("employee").distinct().count(), "repeated": repeated,
        "by_host": _hosts_of_items(batch.pk), "overview_status": page.status_code,
        "overview_hosts": [{key: host[key] for key in ("hostname", "alive", "lost")}
                           for host in page.context["stats"]["hosts"]],
        "overview_host_rows": page.content.decode().count('class="coati-host-row"'),
    }


def main(argv: list[str]) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
    import django

    django.setup()
    command, *args = argv
    print(json.dumps({"prepare": prepare, "start": start, "progress": progress,
                      "cut-point": cut_point, "verify": verify}[command](*args), default=str))


if __name__ == "__main__":
    main(sys.argv[1:])

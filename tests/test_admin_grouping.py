"""Failed items on the batch page are grouped by kind of error, not one group per employee."""

import datetime

import pytest

from coati_queue.admin.batches import failed_item_groups
from coati_queue.models import BatchStatus, ItemStatus, PayrollBatch, PayrollItem


@pytest.mark.django_db
def test_errors_naming_the_employee_fall_into_one_group():
    batch = PayrollBatch.objects.create(
        planilla_id="p1", periodo_inicio=datetime.date(2024, 1, 1),
        periodo_fin=datetime.date(2024, 1, 15), status=BatchStatus.COMPLETED_WITH_ERRORS)
    errors = {"emp_1": "Employee inactive: emp_1", "emp_2": "Employee inactive: emp_2",
              "emp_3": "Employee inactive: emp_3", "emp_4": "Invalid salary for emp_4: -5"}
    PayrollItem.objects.bulk_create(
        PayrollItem(batch=batch, employee_id=e, status=ItemStatus.FAILED, error=msg)
        for e, msg in errors.items())
    PayrollItem.objects.create(batch=batch, employee_id="emp_5", status=ItemStatus.SUCCEEDED)

    groups = failed_item_groups(batch)

    assert [(g["error"], g["count"]) for g in groups] == [
        ("Employee inactive: …", 3), ("Invalid salary for …: -5", 1)]
    assert [i["employee_id"] for i in groups[0]["items"]] == ["emp_1", "emp_2", "emp_3"]


@pytest.mark.django_db
def test_short_numeric_ids_are_masked_only_where_they_stand_as_words():
    batch = PayrollBatch.objects.create(
        planilla_id="p2", periodo_inicio=datetime.date(2024, 1, 1),
        periodo_fin=datetime.date(2024, 1, 15), status=BatchStatus.COMPLETED_WITH_ERRORS)
    same = "No tax bracket for year 2024 (salary 1500.00)"
    errors = {"1": same, "2": same, "10": same, "3": "Employee inactive: 3",
              "4": "Invalid salary for 4: -5", "5": "KeyError: '5'"}
    PayrollItem.objects.bulk_create(
        PayrollItem(batch=batch, employee_id=e, status=ItemStatus.FAILED, error=msg)
        for e, msg in errors.items())

    groups = {g["error"]: g["count"] for g in failed_item_groups(batch)}

    assert groups == {same: 3, "Employee inactive: …": 1, "Invalid salary for …: -5": 1,
                      "KeyError: '…'": 1}

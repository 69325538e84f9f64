"""A payroll hook paced like a real rule engine, so a person can watch progress rise.

The example's ``calculate_many`` pays a chunk of ten employees in a few
milliseconds; a real payroll with its deductions and lookups takes longer.
The browser test's workers use this hook (through ``COATI_TEST_CALCULATE_MANY``)
so the batch page has time to show values between 0 % and 100 %.
"""

import time

from example_project.payroll import services

SECONDS_PER_CHUNK = 0.3


def paced_calculate_many(*args, **kwargs):
    time.sleep(SECONDS_PER_CHUNK)
    return services.calculate_many(*args, **kwargs)


def paced_per_employee(employee_ids, *args, **kwargs):
    """``COATI_TEST_PACE_MS`` milliseconds per employee (default 10), then the real hook.

    The fault battery (tests/test_faults.py) uses it so a batch of a few hundred
    employees lasts long enough for a fault to land in the middle of it.
    """
    import os

    ids = list(employee_ids)
    time.sleep(len(ids) * float(os.environ.get("COATI_TEST_PACE_MS", "10")) / 1000.0)
    return services.calculate_many(ids, *args, **kwargs)

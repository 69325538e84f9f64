"""The test settings with the ``TASKS`` of a test, for worker subprocesses (Django 6+).

A test that changes ``TASKS`` (``override_settings``) gives its workers the same
value: ``COATI_TEST_TASKS`` holds it as JSON (tests/test_django_tasks_queues.py).
"""

import json
import os

from tests.settings import *  # noqa: F401,F403

TASKS = json.loads(os.environ["COATI_TEST_TASKS"])

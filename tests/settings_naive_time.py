"""The test settings with ``USE_TZ = False``, for tests/test_use_tz.py's subprocesses.

Always SQLite (the backend that refuses aware datetimes when ``USE_TZ`` is off), in
the file ``COATI_TEST_DB`` names; the time zone is far from UTC, so a timestamp
stored in UTC instead of local time is hours off.
"""

import os

from example_project.database import database_settings
from tests.settings import *  # noqa: F401,F403

USE_TZ = False
TIME_ZONE = "America/Managua"  # UTC-6 all year: no daylight saving to blur the check
DATABASES = {"default": database_settings(None, os.environ["COATI_TEST_DB"])}
DATABASES["default"]["TEST"] = {"NAME": DATABASES["default"]["NAME"]}

"""Backend selection and the Huey directory chain, against a real redis-server."""

from __future__ import annotations

import logging
import os

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

from coati_queue import BackendUnavailable
from coati_queue import selection
from coati_queue.conf import get_settings
from coati_queue.selection import get_queue_driver
from tests.conftest import free_port, redis_password

PAYROLL = {"ACTIVE_EMPLOYEES": "example_project.payroll.services.active_employee_ids",
           "CALCULATE_EMPLOYEE": "example_project.payroll.services.calculate_and_store"}


def all_log_text(caplog) -> str:
    """Every captured record: message, arguments and any exception text."""
    parts = []
    for record in caplog.records:
        parts.append(record.getMessage())
        if record.exc_info:
            parts.append(logging.Formatter().formatException(record.exc_info))
        if record.exc_text:
            parts.append(record.exc_text)
    return "\n".join(parts)


def selection_lines(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("coati_queue backend:")]


# -- auto: Redis up / down -----------------------------------------------------------------
def test_auto_picks_dramatiq_when_redis_answers(queue_env, redis_url, caplog):
    queue_env(REDIS_URL=redis_url)
    with caplog.at_level(logging.INFO, logger="coati_queue"):
        driver = get_queue_driver()
    assert driver.name == "dramatiq"
    (line,) = selection_lines(caplog)
    assert line.levelno == logging.INFO
    assert "dramatiq" in line.getMessage()
    assert "answered PING" in line.getMessage()
    assert "127.0.0.1" in line.getMessage()
    assert redis_password(redis_url) not in all_log_text(caplog)
    assert redis_password(redis_url) not in driver.describe()
    # Built once per process: a second call neither probes nor logs again.
    caplog.clear()
    assert get_queue_driver() is driver
    assert not selection_lines(caplog)


@pytest.mark.django_db
def test_auto_falls_back_to_huey_when_redis_is_down(queue_env, huey_path, caplog):
    secret = "s3cret-never-logged"
    url = f"redis://:{secret}@127.0.0.1:{free_port()}/0"  # nothing listens there
    queue_env(REDIS_URL=url, COATI_QUEUE_PATH=huey_path)
    with caplog.at_level(logging.INFO, logger="coati_queue"):
        driver = get_queue_driver()
    assert driver.name == "huey"
    assert driver.path == huey_path
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Failed to connect to Redis for Dramatiq" in r.getMessage() for r in warnings)
    assert any(huey_path in r.getMessage() for r in warnings)
    assert secret not in all_log_text(caplog)
    assert secret not in driver.reason
    assert secret not in driver.describe()
    assert secret not in repr(driver.get_stats())
    assert "***" in driver.reason  # the URL is shown, masked


@pytest.mark.django_db
def test_wrong_redis_password_falls_back_without_leaking_it(queue_env, redis_url, huey_path,
                                                            caplog):
    wrong = redis_url.replace(redis_password(redis_url), "wrong-pass-xyz")
    queue_env(REDIS_URL=wrong, COATI_QUEUE_PATH=huey_path)
    with caplog.at_level(logging.INFO, logger="coati_queue"):
        driver = get_queue_driver()
    assert driver.name == "huey"
    assert "Failed to connect to Redis for Dramatiq" in all_log_text(caplog)
    for secret in ("wrong-pass-xyz", redis_password(redis_url)):
        assert secret not in all_log_text(caplog)
        assert secret not in repr(driver.get_stats())


def test_forced_dramatiq_errors_do_not_echo_the_password(queue_env, redis_url):
    wrong = redis_url.replace(redis_password(redis_url), "wrong-pass-xyz")
    queue_env(REDIS_URL=wrong)
    driver = get_queue_driver("dramatiq")
    assert "wrong-pass-xyz" not in driver.describe() + driver.reason + repr(driver)
    with pytest.raises(Exception) as excinfo:
        driver.queue_depths()
    assert "wrong-pass-xyz" not in str(excinfo.value)
    assert "wrong-pass-xyz" not in repr(excinfo.value)


def test_redis_timeout_bounds_the_probe(queue_env, huey_path):
    queue_env(REDIS_URL="redis://10.255.255.1:6379/0", COATI_QUEUE_REDIS_TIMEOUT="0.2",
              COATI_QUEUE_PATH=huey_path)
    import time

    started = time.monotonic()
    assert get_queue_driver().name == "huey"
    assert time.monotonic() - started < 3


# -- environment variables and the COATI_QUEUE dict ----------------------------------------
def test_environment_variables_alone_configure_the_queue(settings, queue_env, redis_url,
                                                         huey_path):
    del settings.COATI_QUEUE
    queue_env(REDIS_URL=redis_url)
    assert get_queue_driver().name == "dramatiq"
    assert get_queue_driver().redis_url == redis_url

    queue_env(REDIS_URL=None, COATI_QUEUE_PATH=huey_path)
    assert get_queue_driver().name == "huey"
    assert get_queue_driver().path == huey_path

    queue_env(QUEUE_ENABLED="0")
    assert get_queue_driver().name == "immediate"
    assert "QUEUE_ENABLED" in get_queue_driver().reason

    queue_env(QUEUE_ENABLED="1", COATI_QUEUE_QUEUES="urgent,default")
    assert get_settings().QUEUES == ["urgent", "default"]
    assert get_queue_driver().name == "huey"


def test_bad_environment_value_names_the_variable(queue_env):
    queue_env(QUEUE_ENABLED="maybe")
    with pytest.raises(ImproperlyConfigured, match="environment variable QUEUE_ENABLED"):
        get_queue_driver()


def test_coati_queue_dict_wins_over_environment_variables(settings, queue_env, huey_path,
                                                          tmp_path):
    env_path = tmp_path / "from-env"
    queue_env(QUEUE_ENABLED="0", COATI_QUEUE_PATH=str(env_path),
              REDIS_URL="redis://127.0.0.1:1/0")
    settings.COATI_QUEUE = {"PAYROLL": PAYROLL, "ENABLED": True, "PATH": huey_path,
                            "REDIS_URL": None}
    driver = get_queue_driver()
    assert driver.name == "huey"
    assert driver.path == huey_path
    assert not env_path.exists()


def test_force_backend_overrides_the_configuration(queue_env, huey_path):
    queue_env(QUEUE_ENABLED="0", COATI_QUEUE_PATH=huey_path)
    assert get_queue_driver().name == "immediate"
    forced = get_queue_driver("huey")
    assert forced.name == "huey"
    assert forced.reason.startswith("forced")
    assert get_queue_driver("immediate").name == "immediate"
    with pytest.raises(BackendUnavailable, match="force_backend='rabbitmq'"):
        get_queue_driver("rabbitmq")
    with pytest.raises(BackendUnavailable, match="REDIS_URL"):
        get_queue_driver("dramatiq")  # no Redis URL configured


@pytest.mark.parametrize("where", ["dict", "env"])
def test_invalid_backend_names_the_key(settings, queue_env, where):
    if where == "dict":
        settings.COATI_QUEUE = {"PAYROLL": PAYROLL, "BACKEND": "rabbitmq"}
    else:
        queue_env(COATI_QUEUE_BACKEND="rabbitmq")
    with pytest.raises(ImproperlyConfigured) as excinfo:
        get_queue_driver()
    assert "BACKEND" in str(excinfo.value)
    assert "rabbitmq" in str(excinfo.value)
    assert "huey" in str(excinfo.value)  # lists the choices


def test_unknown_coati_queue_key_is_refused(settings):
    settings.COATI_QUEUE = {"PAYROLL": PAYROLL, "BAKCEND": "huey"}
    with pytest.raises(ImproperlyConfigured, match="BAKCEND"):
        get_queue_driver()


def test_override_settings_switches_backend_without_manual_reset(queue_env, huey_path):
    queue_env(QUEUE_ENABLED="0")
    assert get_queue_driver().name == "immediate"
    with override_settings(COATI_QUEUE={"PAYROLL": PAYROLL, "ENABLED": True,
                                        "BACKEND": "huey", "PATH": huey_path}):
        assert get_queue_driver().name == "huey"
        assert get_queue_driver().path == huey_path
    assert get_queue_driver().name == "immediate"


# -- the Huey directory chain --------------------------------------------------------------
def error_lines(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


def test_unusable_path_is_refused_and_the_next_candidate_used(queue_env, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    wanted = str(blocker / "queue")  # its parent is a regular file: cannot be created
    queue_env(COATI_QUEUE_PATH=wanted)
    with caplog.at_level(logging.INFO, logger="coati_queue"):
        driver = get_queue_driver()
    assert driver.name == "huey"
    assert wanted in error_lines(caplog)
    assert "COATI_QUEUE_PATH" in error_lines(caplog)
    assert driver.path == selection.SYSTEM_PATH  # the next candidate
    assert os.path.isdir(driver.path)


def test_directory_owned_by_another_user_is_refused(queue_env, tmp_path, caplog):
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o777)
    os.chown(foreign, 12345, 12345)  # tests run as root; ownership still counts
    queue_env(COATI_QUEUE_PATH=str(foreign))
    with caplog.at_level(logging.ERROR, logger="coati_queue"):
        driver = get_queue_driver()
    assert str(foreign) in error_lines(caplog)
    assert "uid 12345" in error_lines(caplog)
    assert driver.path == selection.SYSTEM_PATH
    assert not os.listdir(foreign)  # nothing written there


def test_symlinked_directory_is_refused(queue_env, tmp_path, huey_path, caplog):
    link = tmp_path / "link"
    link.symlink_to(huey_path, target_is_directory=True)
    queue_env(COATI_QUEUE_PATH=str(link))
    with caplog.at_level(logging.ERROR, logger="coati_queue"):
        driver = get_queue_driver()
    assert "symlink" in error_lines(caplog)
    assert str(link) in error_lines(caplog)
    assert driver.path == selection.SYSTEM_PATH
    assert not os.listdir(huey_path)


def test_every_candidate_refused_raises_with_a_hint(queue_env, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for name in ("SYSTEM_PATH", "USER_PATH", "LOCAL_PATH"):
        monkeypatch.setattr(selection, name, str(blocker / name.lower()))
    monkeypatch.setattr(selection.tempfile, "gettempdir", lambda: str(blocker))
    queue_env(COATI_QUEUE_PATH=str(blocker / "wanted"))
    with pytest.raises(BackendUnavailable, match="COATI_QUEUE_PATH"):
        get_queue_driver()

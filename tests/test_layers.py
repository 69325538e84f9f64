"""The import rules of README.rst's "Architecture" hold, and a new break fails CI.

``lint-imports`` (import-linter) runs as a subprocess with setup.cfg's contracts, as
CI would run it; its graph includes imports inside functions. Today's known breaks
are listed in setup.cfg as ``ignore_imports`` (the ratchet).
"""

from __future__ import annotations

import configparser
import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "coati_queue"
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def lint_imports(cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([LINT_IMPORTS, "--no-cache", "--no-logo", "setup.cfg"], cwd=cwd,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(cwd)},
                          capture_output=True, text=True, timeout=120)


def test_import_contracts_are_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout, result.stdout


def copy_project(tmp_path: Path) -> Path:
    """The package and setup.cfg in a temporary directory, to plant a break in."""
    shutil.copytree(PACKAGE, tmp_path / "coati_queue",
                    ignore=shutil.ignore_patterns("__pycache__", "static", "templates", "locale"))
    shutil.copy(REPO / "setup.cfg", tmp_path / "setup.cfg")
    return tmp_path


def test_a_new_break_fails_even_inside_a_function(tmp_path):
    project = copy_project(tmp_path)
    with open(project / "coati_queue" / "core" / "jobs.py", "a") as jobs:
        jobs.write("\n\ndef _planted() -> None:\n    import django.conf  # noqa: F401\n")
    with open(project / "coati_queue" / "views.py", "a") as views:
        views.write("\n\ndef _planted() -> None:\n    import redis  # noqa: F401\n")

    result = lint_imports(project)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "core imports only the standard library BROKEN" in out, out
    assert "coati_queue.core.jobs -> django" in out, out
    assert "only backends import dramatiq, huey and redis BROKEN" in out, out
    assert "coati_queue.views -> redis" in out, out
    assert "layers: imports only go down KEPT" in out, out


def test_a_stale_ratchet_line_fails(tmp_path):
    """A fixed break's line must be deleted, so the ratchet only tightens."""
    project = copy_project(tmp_path)
    config = (project / "setup.cfg").read_text()
    line = "    coati_queue.monitoring -> coati_queue.checks\n"
    assert line in config
    (project / "setup.cfg").write_text(
        config.replace(line, line + "    coati_queue.urls -> coati_queue.worker\n", 1))

    result = lint_imports(project)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "No matches for ignored import coati_queue.urls -> coati_queue.worker" in out, out


def test_core_contract_names_every_other_module():
    """A new top-level module is forbidden to the core as soon as it exists."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    forbidden = set(config["importlinter:contract:core-is-pure"]["forbidden_modules"].split())
    modules = {f"coati_queue.{info.name}" for info in pkgutil.iter_modules([str(PACKAGE)])}
    missing = modules - {"coati_queue.core"} - forbidden
    assert not missing, f"add to setup.cfg [importlinter:contract:core-is-pure]: {missing}"


def test_sending_before_django_setup_says_what_is_missing():
    """The core has no Django to fall back on: without the app's ready() it says so."""
    code = ("import coati_queue\n"
            "@coati_queue.task\n"
            "def add(a: int, b: int) -> int:\n"
            "    return a + b\n"
            "try:\n"
            "    add.send(1, 2)\n"
            "except coati_queue.CoatiQueueError as exc:\n"
            "    print(type(exc).__name__, exc)\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("NotSetUp coati_queue cannot send a task yet"), result.stdout
    assert "INSTALLED_APPS" in result.stdout

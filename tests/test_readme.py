"""Every Python snippet of README.rst runs as written (settings fragments excepted)."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.rst"
SETTINGS_FRAGMENT = ("# settings.py", "COATI_QUEUE = {")


def python_blocks() -> list[str]:
    blocks = []
    for match in re.finditer(r"\.\. code-block:: python\n\n((?:    .*\n|\n)+)", README.read_text()):
        code = "\n".join(line[4:] for line in match.group(1).splitlines())
        if not code.lstrip().startswith(SETTINGS_FRAGMENT):
            blocks.append(code)
    return blocks


def calculate_something(employee_id, value):
    """The origin design's example task body."""
    return {"employee_id": employee_id, "doubled": value * 2}


def test_readme_has_the_snippets_this_test_runs():
    assert len(python_blocks()) == 4


@pytest.mark.django_db(transaction=True)  # no outer transaction: sends happen at once
def test_readme_snippets_run_in_order(queue_env, capsys):
    queue_env(QUEUE_ENABLED="0")  # the snippets run inline, still tracked
    namespace = {"calculate_something": calculate_something}
    for code in python_blocks():
        exec(compile(code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["result"]["status"] == "failed"  # planilla_123 has no employee emp_456
    assert namespace["batch"].status == "failed"
    assert "Planilla not found" in namespace["batch"].error

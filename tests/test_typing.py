"""The public API type-checks: users get their task's signature back from ``@task``.

mypy runs as a subprocess with the project's own configuration (setup.cfg ``[mypy]``),
as a user or CI would run it; each run uses a fresh cache in a temporary directory.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PUBLIC_API = ["coati_queue/__init__.py", "coati_queue/core", "coati_queue/backends/base.py"]

# A user's tasks module. A line ending in "# E: <text>" must get exactly one mypy error
# containing <text>; every other line must get none. "# N: <text>" is a reveal_type note
# (older mypy spells builtins.int, newer int: compared without "builtins.").
USER_MODULE = textwrap.dedent('''\
    from coati_queue import Task, get_queue_driver, task

    @task
    def add(a: int, b: int) -> int:
        return a + b

    @task(queue="high", max_retries=2)
    def greet(name: str, *, loud: bool = False) -> str:
        return name.upper() if loud else name

    reveal_type(add)  # N: Task[[a: int, b: int], int]
    reveal_type(greet)  # N: Task[[name: str, *, loud: bool =], str]

    task_id: str = add.send(1, 2)
    total: int = add(1, 2)
    greet.send("ana", loud=True)
    shout: str = greet("ana", loud=True)
    add.send_with_options(args=(1, 2), kwargs={}, delay=1.5, queue="high", on_commit=False)
    add.send_many([((1, 2), {}), ((), {"a": 3, "b": 4})])
    get_queue_driver().enqueue("x.add", 1, 2)
    typed: Task[[int, int], int] = add

    add.send("1", 2)  # E: Argument 1 to "send" of "Task" has incompatible type "str"
    add(1, "2")  # E: Argument 2 to "__call__" of "Task" has incompatible type "str"; expected "int"
    add.send(1)  # E: Missing positional argument "b" in call to "send" of "Task"
    greet.send("ana", loud="yes")  # E: Argument "loud" to "send" of "Task" has incompatible type
    greet(name=3)  # E: Argument "name" to "__call__" of "Task" has incompatible type "int"
    wrong_result: str = add(1, 2)  # E: Incompatible types in assignment (expression has type "int"
    wrong_id: int = add.send(1, 2)  # E: Incompatible types in assignment (expression has type "str"
    add.send_with_options(args=(1, 2), dealy=5)  # E: Unexpected keyword argument "dealy"
    get_queue_driver().enqueue_now("x.add")  # E: "QueueDriver" has no attribute "enqueue_now"
''')


def run_mypy(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "setup.cfg"),
         "--cache-dir", str(cache), "--no-error-summary", "--hide-error-context",
         "--no-pretty", "--show-absolute-path", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120)


def test_public_api_is_strict_clean(tmp_path):
    result = run_mypy("--strict", *PUBLIC_API, cache=tmp_path / "cache")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == "", result.stdout


def test_task_keeps_the_function_signature_for_type_checkers(tmp_path):
    module = tmp_path / "user_tasks.py"
    module.write_text(USER_MODULE)
    result = run_mypy("--strict", str(module), cache=tmp_path / "cache")
    assert result.returncode == 1, result.stdout + result.stderr

    found: dict[tuple[int, str], list[str]] = {}
    for line in result.stdout.splitlines():
        match = re.match(r"(?P<path>.+?):(?P<line>\d+): (?P<kind>error|note): (?P<text>.*)", line)
        assert match, f"unexpected mypy output: {line}"
        assert match["path"] == str(module), line  # nothing reported inside coati_queue
        if match["kind"] == "note" and not match["text"].startswith("Revealed type"):
            continue  # the 'defined in' hint after an error
        text = match["text"].replace("builtins.", "")
        found.setdefault((int(match["line"]), match["kind"]), []).append(text)

    expected: dict[tuple[int, str], str] = {}
    for number, source in enumerate(USER_MODULE.splitlines(), start=1):
        marker = re.search(r"# ([EN]): (.*)$", source)
        if marker:
            expected[(number, "error" if marker[1] == "E" else "note")] = marker[2]

    assert set(found) == set(expected), result.stdout
    for key, text in expected.items():
        assert len(found[key]) == 1 and text in found[key][0], (key, found[key])

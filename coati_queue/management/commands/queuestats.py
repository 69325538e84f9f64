"""``manage.py queuestats``: per-queue depths, task counts and workers (like RQ's rqstats)."""

from __future__ import annotations

import json
from argparse import ArgumentTypeError
from time import sleep

from django.core.management.base import BaseCommand, CommandError

from coati_queue.checks import health_findings
from coati_queue.stats import QUEUE_COLUMNS

CLEAR_SCREEN = "\033[2J\033[H"


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if value <= 0:
        raise ArgumentTypeError(f"must be more than 0, got {text}")
    return value


class Command(BaseCommand):
    help = ("Show each queue's queued, delayed, processing, finished and failed tasks, its "
            "live workers and the dead letters waiting to be looked at.")

    def add_arguments(self, parser):
        output = parser.add_mutually_exclusive_group()
        output.add_argument("--json", action="store_true", help="print JSON")
        output.add_argument("--yaml", action="store_true", help="print YAML (needs PyYAML)")
        parser.add_argument("--interval", type=positive_float, default=None, metavar="N",
                            help="refresh every N seconds until Ctrl-C")
        parser.add_argument("--backend", choices=["huey", "dramatiq"], default=None,
                            help="force a backend instead of COATI_QUEUE['BACKEND']")

    def handle(self, *args, **options):
        from coati_queue.redis_url import masked_broker_error
        from coati_queue.selection import get_queue_driver
        from coati_queue.stats import collect_stats

        render = self.render_table
        if options["json"]:
            render = self.render_json
        elif options["yaml"]:
            render = self.render_yaml(self.import_yaml())
        try:
            driver = get_queue_driver(options["backend"])
        except Exception as exc:
            raise CommandError(
                f"Cannot reach the queue backend: {masked_broker_error(exc)}") from exc
        interval = options["interval"]
        clear = interval is not None and self.stdout.isatty()
        try:
            while True:
                try:
                    stats = collect_stats(driver)
                    stats["findings"] = health_findings()
                except Exception as exc:
                    raise CommandError(
                        f"Cannot read queue statistics from {driver.describe()}: "
                        f"{masked_broker_error(exc, getattr(driver, 'redis_url', None))}"
                    ) from exc
                if clear:
                    self.stdout.write(CLEAR_SCREEN, ending="")
                self.stdout.write(render(stats))
                if interval is None:
                    return
                self.stdout.flush()
                sleep(interval)
        except KeyboardInterrupt:
            return

    @staticmethod
    def import_yaml():
        try:
            import yaml
        except ImportError:
            raise CommandError(
                "--yaml needs PyYAML: install PyYAML (pip install coati-queue[test] or pyyaml)"
            ) from None
        return yaml

    # -- renderers ----------------------------------------------------------
    @staticmethod
    def render_json(stats: dict) -> str:
        return json.dumps(stats, indent=2)

    @staticmethod
    def render_yaml(yaml):
        def render(stats: dict) -> str:
            return "---\n" + yaml.safe_dump(stats, sort_keys=False, default_flow_style=False)

        return render

    def render_table(self, stats: dict) -> str:
        lines = [f"Backend: {stats['backend']} ({stats['reason']}) - {stats['location']}"]
        lines += [f"DEGRADED: {finding}" for finding in stats.get("degraded", [])]
        lines += [f"{f['level'].upper()} {f['id']}: {f['message']} Fix: {f['hint']}"
                  for f in stats.get("findings", [])]
        lines.append("")
        headers = ("queue",) + QUEUE_COLUMNS
        rows = [(name,) + tuple(str(counts[c]) for c in QUEUE_COLUMNS)
                for name, counts in stats["queues"].items()]
        totals = ("total",) + tuple(
            str(sum(counts[c] for counts in stats["queues"].values()))
            for c in QUEUE_COLUMNS if c != "workers") + (
            str(sum(1 for w in stats["workers"] if w["alive"])),)
        widths = [max(len(row[i]) for row in [headers, totals, *rows])
                  for i in range(len(headers))]

        def line(row):
            return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(row, widths)))

        lines.append(line(headers))
        lines.append("  ".join("-" * w for w in widths))
        lines += [line(row) for row in rows]
        lines.append(line(totals))
        lines.append("")
        lines.append(self.dead_letter_line(stats.get("dead_letters")))
        if not stats["workers"]:
            lines.append("No workers running.")
        for host in stats.get("hosts", []):
            lines.append(f"Host {host['hostname']}: {host['alive']} worker(s) alive, "
                         f"{host['lost']} lost, {host['running_tasks']} task(s) running")
        for worker in stats["workers"]:
            state = "alive" if worker["alive"] else "LOST: no heartbeat"
            lines.append(f"Worker {worker['worker_id']} pid {worker['pid']} on "
                         f"{worker['hostname']}: {','.join(worker['queues'])}; last seen "
                         f"{worker['last_seen']} ({state}); {self.running_text(worker)}")
        return "\n".join(lines)

    @staticmethod
    def running_text(worker: dict) -> str:
        """What the worker runs now: its longest-running task, for how long, and how many
        more (a stuck task shows here before its time limit hits)."""
        task = worker.get("current_task")
        if not task:
            return "idle"
        more = worker.get("running_tasks", 1) - 1
        return (f"running {task['name']} ({task['id']}) for {task['running_seconds']:.1f} s"
                + (f" and {more} more task(s)" if more > 0 else ""))

    @staticmethod
    def dead_letter_line(counts: dict | None) -> str:
        if not counts or not counts["waiting"]:
            return "Dead letters waiting: 0"
        sources = ", ".join(f"{source} {n}" for source, n in sorted(counts["by_source"].items())
                            if n)
        return (f"Dead letters waiting: {counts['waiting']} ({sources}); requeue or delete them "
                "in the admin (Dead letters).")

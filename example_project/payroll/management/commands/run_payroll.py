"""``run_payroll``: start a coati_queue payroll batch and optionally watch it finish.

Without ``--wait`` it prints the batch id and returns at once (the workers do
the work). With ``--wait`` it shows live progress, then the totals and every
failure, and exits with status 1 when anything failed, so CI can gate on it.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from typing import Any, TextIO

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db.models import Count, Sum
from rich.console import Console
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, ProgressColumn, Task,
                           TaskProgressColumn, TextColumn)
from rich.table import Table
from rich.text import Text

from coati_queue.core.exceptions import CoatiQueueError
from coati_queue.models import ItemStatus, PayrollBatch, PayrollItem

from ...models import PayrollLine

PLAIN_PROGRESS_EVERY_SECONDS = 1.0
MAX_FAILURES_SHOWN = 50
UNSUCCESSFUL_BATCH_STATES = ("failed", "cancelled")
STATUS_STYLES = {"completed": "green", "failed": "red", "cancelled": "red"}


def iso_date(value: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date (YYYY-MM-DD).") from None


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def money(value: Any) -> str:
    return f"{value or 0:,.2f}"


class RateColumn(ProgressColumn):
    """Employees per second as measured by coati_queue (same figure as the dashboard)."""

    def render(self, task: Task) -> Text:
        rate = task.fields.get("rate")
        label = f"{rate:,.1f} employees/s" if rate else "– employees/s"
        return Text(label, style="progress.data.speed")


class EtaColumn(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"ETA {format_seconds(task.fields.get('eta'))}", style="progress.remaining")


class Command(BaseCommand):
    help = "Start a payroll batch for a planilla and period; --wait watches it to the end."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--planilla", required=True, help="Planilla code, e.g. planilla_demo.")
        parser.add_argument("--desde", required=True, type=iso_date,
                            help="First day of the period (YYYY-MM-DD).")
        parser.add_argument("--hasta", required=True, type=iso_date,
                            help="Last day of the period (YYYY-MM-DD).")
        parser.add_argument("--usuario", default="",
                            help="Who requested the run (recorded on the batch and lines).")
        parser.add_argument("--wait", action="store_true",
                            help="Watch the batch until it finishes; exit 1 if anything failed.")
        parser.add_argument("--poll", type=float, default=0.25,
                            help="Seconds between progress checks with --wait (default 0.25).")

    def handle(self, *args: Any, **options: Any) -> None:
        start, end = options["desde"], options["hasta"]
        if end < start:
            raise CommandError(f"--hasta {end} is before --desde {start}.")
        if options["poll"] <= 0:
            raise CommandError("--poll must be a positive number of seconds.")
        # Imported here: the orchestration module is only needed when a run starts.
        from coati_queue.payroll import start_payroll_batch

        try:
            batch: PayrollBatch = start_payroll_batch(
                options["planilla"], start, end, usuario=options["usuario"])
        except (CoatiQueueError, LookupError, ValueError, ValidationError) as exc:
            raise CommandError(str(exc)) from exc

        console = self._console()
        batch.refresh_from_db()  # the fan-out may already have run (immediate backend)
        size = f", {batch.total} employees" if batch.total else ""
        console.print(f"Payroll batch [bold]{batch.pk}[/bold] started: planilla "
                      f"{escape(batch.planilla_id)}, {batch.periodo_inicio}..{batch.periodo_fin} "
                      f"({batch.status}{size}).", soft_wrap=True)
        if not options["wait"]:
            return
        try:
            self._watch(batch, console, options["poll"])
        except KeyboardInterrupt:
            console.print(f"Stopped watching; batch {batch.pk} keeps running in the background.",
                          soft_wrap=True)
            raise SystemExit(130) from None
        if not self._summarize(batch, console):
            raise SystemExit(1)

    def _console(self) -> Console:
        """A rich console on the command's stdout; plain text when it is not a terminal."""
        out: TextIO = getattr(self.stdout, "_out", sys.stdout)
        is_tty = hasattr(out, "isatty") and out.isatty()
        return Console(file=out, force_terminal=None if is_tty else False, highlight=False)

    def _watch(self, batch: PayrollBatch, console: Console, poll: float) -> None:
        if console.is_terminal:
            self._watch_live(batch, console, poll)
        else:
            self._watch_plain(batch, console, poll)

    def _watch_live(self, batch: PayrollBatch, console: Console, poll: float) -> None:
        columns = (TextColumn("[progress.description]{task.description}"), BarColumn(),
                   MofNCompleteColumn(), TaskProgressColumn(), RateColumn(), EtaColumn())
        with Progress(*columns, console=console) as progress:
            planilla = escape(batch.planilla_id)
            task_id = progress.add_task(planilla, total=None)
            while True:
                batch.refresh_from_db()
                state = batch.progress()
                failed = f" [red]({state['failed']} failed)[/red]" if state["failed"] else ""
                progress.update(
                    task_id, total=state["total"] or None,
                    completed=state["completed"] + state["failed"],
                    description=f"{planilla} {state['status']}{failed}",
                    rate=state["rate_per_second"], eta=state["eta_seconds"],
                )
                if batch.is_finished:
                    return
                time.sleep(poll)

    def _watch_plain(self, batch: PayrollBatch, console: Console, poll: float) -> None:
        """One readable line per second: CI logs cannot redraw a bar."""
        last_print = float("-inf")
        while True:
            batch.refresh_from_db()
            now = time.monotonic()
            if batch.is_finished or now - last_print >= PLAIN_PROGRESS_EVERY_SECONDS:
                state = batch.progress()
                processed = state["completed"] + state["failed"]
                rate = state["rate_per_second"]
                console.print(
                    f"batch {batch.pk} {state['status']}: {processed}/{state['total']} "
                    f"({state['progress_percentage']:.1f}%), {state['failed']} failed, "
                    f"{f'{rate:,.1f}' if rate else '–'} employees/s, "
                    f"ETA {format_seconds(state['eta_seconds'])}",
                    soft_wrap=True,
                )
                last_print = now
            if batch.is_finished:
                return
            time.sleep(poll)

    def _summarize(self, batch: PayrollBatch, console: Console) -> bool:
        """Print totals and failures; True when the run is clean."""
        totals = PayrollLine.objects.filter(batch_id=batch.pk).aggregate(
            employees=Count("id"), gross=Sum("gross"), deductions=Sum("total_deductions"),
            employer_cost=Sum("employer_cost"), net=Sum("net"),
        )
        failures = PayrollItem.objects.filter(batch=batch, status=ItemStatus.FAILED)
        failure_count = failures.count()

        summary = Table(title=f"Payroll batch {batch.pk}")
        summary.add_column("Concept")
        summary.add_column("Total", justify="right")
        summary.add_row("Planilla", Text(batch.planilla_id))
        summary.add_row("Period", f"{batch.periodo_inicio} .. {batch.periodo_fin}")
        summary.add_row("Status", batch.status, style=STATUS_STYLES.get(batch.status, "yellow"))
        summary.add_row("Employees", f"{totals['employees']:,}")
        summary.add_row("Gross", money(totals["gross"]))
        summary.add_row("Deductions (INSS + IR)", money(totals["deductions"]))
        summary.add_row("Employer cost", money(totals["employer_cost"]))
        summary.add_row("Net", money(totals["net"]))
        summary.add_row("Failures", f"{failure_count:,}",
                        style="red" if failure_count else None)
        console.print(summary)
        if batch.error:
            console.print(Text("Batch error: ", style="red") + Text(batch.error))

        if failure_count:
            table = Table(title="Failures")
            table.add_column("Employee")
            table.add_column("Reason", overflow="fold")
            shown = failures.order_by("employee_id").values_list("employee_id", "error")
            for employee_id, error in shown[:MAX_FAILURES_SHOWN]:
                # Text, not markup: error messages may contain [brackets].
                table.add_row(Text(employee_id), Text(error or "–"))
            console.print(table)
            if failure_count > MAX_FAILURES_SHOWN:
                console.print(f"... and {failure_count - MAX_FAILURES_SHOWN} more.")
        return not failure_count and not batch.failed and \
            batch.status not in UNSUCCESSFUL_BATCH_STATES

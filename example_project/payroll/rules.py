"""Per-process caches of the rule tables and of companies' head counts.

The payroll hook runs thousands of times per second across worker threads, so
the rule set (two queries) and the head count behind the employer INSS rate (one
COUNT per company and period) are read once and reused. Entries also expire
after a few minutes: other processes (the admin, ``seed_demo``) may change the
data, and their ``post_save`` signals only reach their own process.
"""

from __future__ import annotations

import datetime
import threading
import time
from decimal import Decimal
from typing import Callable, Generic, Hashable, TypeVar

from django.db.models import Q

from .calculation import Rules, TaxBracket
from .models import Employee, PayrollRuleSet

RULES_TTL_SECONDS = 300.0
HEAD_COUNT_TTL_SECONDS = 60.0

V = TypeVar("V")


class ExpiringCache(Generic[V]):
    """A small thread-safe memo whose entries expire; loads happen outside the lock."""

    def __init__(self, ttl: float, maxsize: int = 1024) -> None:
        self.ttl = ttl
        self.maxsize = maxsize
        self._entries: dict[Hashable, tuple[float, V]] = {}
        self._lock = threading.Lock()

    def get_or_load(self, key: Hashable, load: Callable[[], V]) -> V:
        now = time.monotonic()
        with self._lock:
            entry = self._entries.get(key)
        if entry is not None and entry[0] > now:
            return entry[1]
        value = load()
        with self._lock:
            if len(self._entries) >= self.maxsize:
                self._entries.clear()
            self._entries[key] = (now + self.ttl, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


RuleSetsByDate = tuple[tuple[datetime.date, Rules], ...]

_rule_sets: ExpiringCache[RuleSetsByDate] = ExpiringCache(RULES_TTL_SECONDS)
_head_counts: ExpiringCache[int] = ExpiringCache(HEAD_COUNT_TTL_SECONDS)


def clear_caches() -> None:
    """Forget cached rule sets and head counts (signals call it on every change)."""
    _rule_sets.clear()
    _head_counts.clear()


def _load_rule_sets() -> RuleSetsByDate:
    """Every rule set as an immutable snapshot, newest first (a handful of rows)."""
    snapshots = []
    for ruleset in PayrollRuleSet.objects.prefetch_related("brackets").order_by("-valid_from"):
        brackets = tuple(
            TaxBracket(lower=b.lower, upper=b.upper, base_tax=b.base_tax, rate=b.rate)
            for b in ruleset.brackets.all()
        )
        snapshots.append((ruleset.valid_from, Rules(
            code=ruleset.code,
            inss_laboral_rate=ruleset.inss_laboral_rate,
            inss_ceiling_monthly=ruleset.inss_ceiling_monthly,
            inss_patronal_rate=ruleset.inss_patronal_rate,
            inss_patronal_rate_large=ruleset.inss_patronal_rate_large,
            inss_patronal_large_threshold=ruleset.inss_patronal_large_threshold,
            inatec_rate=ruleset.inatec_rate,
            brackets=brackets,
        )))
    return tuple(snapshots)


def rules_for_period(period_start: datetime.date, period_end: datetime.date) -> Rules:
    """The rule set in force on the period's last day (the pay date)."""
    for valid_from, rules in _rule_sets.get_or_load("all", _load_rule_sets):
        if valid_from <= period_end:
            return rules
    raise LookupError(
        f"No payroll rule set is valid for the period {period_start}..{period_end}: "
        "add one (Payroll rule sets in the admin) with an earlier 'valid from' date."
    )


def company_head_count(company_id: int, period_start: datetime.date,
                       period_end: datetime.date) -> int:
    """Active employees of the company (all its planillas) employed during the period."""
    def count() -> int:
        return Employee.objects.filter(
            Q(termination_date__isnull=True) | Q(termination_date__gte=period_start),
            planilla__company_id=company_id, active=True, hire_date__lte=period_end,
        ).count()

    return _head_counts.get_or_load((company_id, period_start, period_end), count)


def employer_rate(rules: Rules, company_id: int, head_count_override: int | None,
                  period_start: datetime.date, period_end: datetime.date) -> Decimal:
    """Employer INSS rate: the company's override head count, else its counted one."""
    if head_count_override is not None:
        return rules.employer_rate(head_count_override)
    return rules.employer_rate(company_head_count(company_id, period_start, period_end))

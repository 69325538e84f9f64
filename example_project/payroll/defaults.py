"""The default Nicaraguan rule set, as data shared by the data migration and tests.

Rates: INSS laboral 7 %, patronal 21.5 % (22.5 % from 50 employees), INATEC 2 %
(Decreto Presidencial 06-2019). Income tax: the annual progressive IR table for
salaried income (Ley 822, Ley de Concertación Tributaria, art. 23). The monthly
INSS contribution ceiling is data too: update it in the admin when it changes.

This module imports no models: ``install_default_rules`` takes the model
classes, so the migration can pass its historical models.
"""

from __future__ import annotations

import datetime
from decimal import Decimal
from typing import Any

DEFAULT_RULESET: dict[str, Any] = {
    "code": "NI-2019",
    "description": "Nicaragua: INSS Decreto 06-2019, IR table Ley 822",
    "valid_from": datetime.date(2019, 2, 1),
    "inss_laboral_rate": Decimal("0.0700"),
    "inss_ceiling_monthly": Decimal("191969.39"),
    "inss_patronal_rate": Decimal("0.2150"),
    "inss_patronal_rate_large": Decimal("0.2250"),
    "inss_patronal_large_threshold": 50,
    "inatec_rate": Decimal("0.0200"),
}

# (lower, upper, base tax, rate on the excess over lower), annual amounts in NIO.
DEFAULT_IR_BRACKETS: list[tuple[Decimal, Decimal | None, Decimal, Decimal]] = [
    (Decimal("0.00"), Decimal("100000.00"), Decimal("0.00"), Decimal("0.0000")),
    (Decimal("100000.00"), Decimal("200000.00"), Decimal("0.00"), Decimal("0.1500")),
    (Decimal("200000.00"), Decimal("350000.00"), Decimal("15000.00"), Decimal("0.2000")),
    (Decimal("350000.00"), Decimal("500000.00"), Decimal("45000.00"), Decimal("0.2500")),
    (Decimal("500000.00"), None, Decimal("82500.00"), Decimal("0.3000")),
]


def install_default_rules(ruleset_model: Any, bracket_model: Any, using: str = "default") -> Any:
    """Create or refresh the default rule set and its brackets; returns the rule set.

    Useful after a test flush (``transaction=True`` tests empty every table,
    including the rows the data migration loaded).
    """
    defaults = {key: value for key, value in DEFAULT_RULESET.items() if key != "code"}
    ruleset, _ = ruleset_model.objects.using(using).update_or_create(
        code=DEFAULT_RULESET["code"], defaults=defaults)
    bracket_model.objects.using(using).filter(ruleset=ruleset).delete()
    bracket_model.objects.using(using).bulk_create([
        bracket_model(ruleset=ruleset, lower=lower, upper=upper, base_tax=base_tax, rate=rate)
        for lower, upper, base_tax, rate in DEFAULT_IR_BRACKETS
    ])
    return ruleset

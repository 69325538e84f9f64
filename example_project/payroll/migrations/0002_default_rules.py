"""Default Nicaraguan rule set, so ``migrate`` alone gives a working payroll.

Rates: INSS laboral 7 %, patronal 21.5 % (22.5 % from 50 employees), INATEC 2 %
(Decreto Presidencial 06-2019). Income tax: the annual progressive IR table for
salaried income (Ley 822, Ley de Concertación Tributaria, art. 23). The monthly
INSS contribution ceiling is data too: update it in the admin when it changes.
"""

import datetime
from decimal import Decimal

from django.db import migrations

RULESET = {
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
IR_BRACKETS = [
    (Decimal("0.00"), Decimal("100000.00"), Decimal("0.00"), Decimal("0.0000")),
    (Decimal("100000.00"), Decimal("200000.00"), Decimal("0.00"), Decimal("0.1500")),
    (Decimal("200000.00"), Decimal("350000.00"), Decimal("15000.00"), Decimal("0.2000")),
    (Decimal("350000.00"), Decimal("500000.00"), Decimal("45000.00"), Decimal("0.2500")),
    (Decimal("500000.00"), None, Decimal("82500.00"), Decimal("0.3000")),
]


def load_default_rules(apps, schema_editor):
    PayrollRuleSet = apps.get_model("payroll", "PayrollRuleSet")
    IncomeTaxBracket = apps.get_model("payroll", "IncomeTaxBracket")
    db = schema_editor.connection.alias
    defaults = {key: value for key, value in RULESET.items() if key != "code"}
    ruleset, _ = PayrollRuleSet.objects.using(db).update_or_create(
        code=RULESET["code"], defaults=defaults)
    IncomeTaxBracket.objects.using(db).filter(ruleset=ruleset).delete()
    IncomeTaxBracket.objects.using(db).bulk_create([
        IncomeTaxBracket(ruleset=ruleset, lower=lower, upper=upper, base_tax=base_tax, rate=rate)
        for lower, upper, base_tax, rate in IR_BRACKETS
    ])


def remove_default_rules(apps, schema_editor):
    PayrollRuleSet = apps.get_model("payroll", "PayrollRuleSet")
    PayrollRuleSet.objects.using(schema_editor.connection.alias).filter(
        code=RULESET["code"]).delete()


class Migration(migrations.Migration):

    dependencies = [
        ("payroll", "0001_initial"),
    ]

    operations = [
        migrations.RunPython(load_default_rules, remove_default_rules),
    ]

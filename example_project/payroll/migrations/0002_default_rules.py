"""Load the default Nicaraguan rule set, so ``migrate`` alone gives a working payroll.

The data lives in ``example_project.payroll.defaults`` (rates, ceiling and the
annual IR table, with their legal sources).
"""

from django.db import migrations

from example_project.payroll.defaults import DEFAULT_RULESET, install_default_rules


def load_default_rules(apps, schema_editor):
    install_default_rules(apps.get_model("payroll", "PayrollRuleSet"),
                          apps.get_model("payroll", "IncomeTaxBracket"),
                          using=schema_editor.connection.alias)


def remove_default_rules(apps, schema_editor):
    PayrollRuleSet = apps.get_model("payroll", "PayrollRuleSet")
    PayrollRuleSet.objects.using(schema_editor.connection.alias).filter(
        code=DEFAULT_RULESET["code"]).delete()


class Migration(migrations.Migration):

    dependencies = [
        ("payroll", "0001_initial"),
    ]

    operations = [
        migrations.RunPython(load_default_rules, remove_default_rules),
    ]

"""AppConfig: connects the cache invalidation of the payroll services."""

from django.apps import AppConfig
from django.db.models.signals import post_delete, post_migrate, post_save
from django.utils.translation import gettext_lazy as _


class PayrollConfig(AppConfig):
    name = "example_project.payroll"
    label = "payroll"
    verbose_name = _("Payroll")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import models, services

        # Rules, companies and head counts are cached per process by the services;
        # any change to them through the ORM drops those caches.
        for model in (models.PayrollRuleSet, models.IncomeTaxBracket, models.Company,
                      models.Planilla, models.Employee):
            uid = f"payroll_clear_caches_{model.__name__}"
            post_save.connect(services.clear_caches_on_change, sender=model,
                              dispatch_uid=f"{uid}_save")
            post_delete.connect(services.clear_caches_on_change, sender=model,
                                dispatch_uid=f"{uid}_delete")
        # flush (e.g. between transactional tests) deletes rows without signals but
        # is followed by post_migrate.
        post_migrate.connect(services.clear_caches_on_change, dispatch_uid="payroll_clear_caches")

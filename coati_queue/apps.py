"""AppConfig: wires signals, checks and task discovery. Builds no client."""

from django.apps import AppConfig
from django.utils.translation import gettext_lazy as _


class CoatiQueueConfig(AppConfig):
    name = "coati_queue"
    verbose_name = _("Background jobs")
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.core.signals import setting_changed
        from django.utils.module_loading import autodiscover_modules

        from . import checks  # noqa: F401  (registers system checks)
        from .core import ports
        from .redis_url import hide_redis_url_on_error_pages
        from .selection import get_queue_driver, reset_on_setting_changed
        from .time_limits import running_jobs

        # The core calls up through its ports instead of importing the layers above it.
        ports.set_sender(get_queue_driver)
        ports.set_job_runner(running_jobs)

        hide_redis_url_on_error_pages()  # DEBUG pages show REDIS_URL as stars

        setting_changed.connect(reset_on_setting_changed, dispatch_uid="coati_queue_reset")
        # Import tasks.py of every installed app (and our own payroll tasks) so a
        # worker knows every task name before the first message arrives.
        from . import payroll  # noqa: F401

        try:  # Django 6+: the runner of django.tasks functions (coati_queue.django_tasks)
            import django.tasks  # noqa: F401
        except ImportError:
            pass
        else:
            from . import django_tasks  # noqa: F401

        autodiscover_modules("tasks")

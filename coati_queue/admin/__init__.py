"""Admin registrations of coati_queue (a package: one module per concern).

* ``batches``: payroll batches (live progress, retry/cancel, start form) and items;
* ``tasks``: task records (read-only, retry actions), workers, the queue overview;
* ``display``: escaped HTML fragments and number formats shared by both.
"""

from django.contrib import admin

from ..models import PayrollBatch, PayrollItem, TaskResult, WorkerHeartbeat
from .batches import PayrollBatchAdmin, PayrollItemAdmin
from .tasks import TaskResultAdmin, WorkerHeartbeatAdmin

admin.site.register(PayrollBatch, PayrollBatchAdmin)
admin.site.register(PayrollItem, PayrollItemAdmin)
admin.site.register(TaskResult, TaskResultAdmin)
admin.site.register(WorkerHeartbeat, WorkerHeartbeatAdmin)

__all__ = ["PayrollBatchAdmin", "PayrollItemAdmin", "TaskResultAdmin", "WorkerHeartbeatAdmin"]

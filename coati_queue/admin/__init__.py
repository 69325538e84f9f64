"""Admin registrations of coati_queue (a package: one module per concern).

* ``batches``: payroll batches (live progress, retry/cancel, start form) and items;
* ``tasks``: task records (read-only, retry actions), workers, the queue overview;
* ``dead_letters``: messages no worker could run (read-only, requeue action);
* ``display``: escaped HTML fragments and number formats shared by both.
"""

from django.contrib import admin

from ..models import DeadLetter, PayrollBatch, PayrollItem, TaskResult, WorkerHeartbeat
from .batches import PayrollBatchAdmin, PayrollItemAdmin
from .dead_letters import DeadLetterAdmin
from .tasks import TaskResultAdmin, WorkerHeartbeatAdmin

admin.site.register(PayrollBatch, PayrollBatchAdmin)
admin.site.register(PayrollItem, PayrollItemAdmin)
admin.site.register(TaskResult, TaskResultAdmin)
admin.site.register(WorkerHeartbeat, WorkerHeartbeatAdmin)
admin.site.register(DeadLetter, DeadLetterAdmin)

__all__ = ["DeadLetterAdmin", "PayrollBatchAdmin", "PayrollItemAdmin", "TaskResultAdmin",
           "WorkerHeartbeatAdmin"]

"""``path("queue/", include("coati_queue.urls"))``: JSON progress and Prometheus metrics."""

from django.urls import path

from . import views

app_name = "coati_queue"

urlpatterns = [
    path("batches/<int:pk>/progress/", views.batch_progress, name="batch-progress"),
    path("metrics", views.metrics, name="metrics"),
]

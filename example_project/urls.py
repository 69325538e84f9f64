"""URLs: the admin and coati_queue's dashboard / JSON API under /queue/."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("queue/", include("coati_queue.urls")),
]

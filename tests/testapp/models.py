from django.db import models


class Mark(models.Model):
    label = models.CharField(max_length=100)
    queue = models.CharField(max_length=32, default="default")
    started = models.FloatField()

    class Meta:
        app_label = "testapp"

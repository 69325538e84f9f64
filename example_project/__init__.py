"""Runnable example project: a Nicaraguan payroll computed through coati_queue."""

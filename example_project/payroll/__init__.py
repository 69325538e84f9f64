"""Nicaraguan payroll: the business side the coati_queue payroll hooks call into."""

"""Placeholder: replaced by the payroll orchestration."""

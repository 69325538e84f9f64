"""Drivers: the only modules that import a queue library, loaded lazily."""

"""The core: tasks, registry, job envelope, middleware hooks, execution and retries.

Nothing in this package imports dramatiq or huey.
"""

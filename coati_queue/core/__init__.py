"""The core: tasks, registry, job envelope, middleware hooks, execution and retries.

Imports only the standard library (no Django, no queue library, no other coati
module: the ``core-is-pure`` import contract in setup.cfg); it reaches the layers
above through ``ports``.
"""

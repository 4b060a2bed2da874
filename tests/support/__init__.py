"""Shared test helpers: process spawning, polling, the recording handler and its checker.

Importable as ``tests.support.*`` both from the test process (``tests/conftest.py``
puts the repository root on ``sys.path``) and from spawned ``fleet`` processes (the
``spawn`` fixture puts it on ``PYTHONPATH``), so handler specs such as
``tests.support.recording:handle`` resolve in workers.
"""

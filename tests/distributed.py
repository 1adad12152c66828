"""Test-side name for the local multi-process runner."""

from mohge.launch.local import free_port, run_ranks  # noqa: F401

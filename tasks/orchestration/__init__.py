"""Prefect: the tasks, their retry policy, the workarounds, the temporary server."""

"""The built-in jobs, one module each (the registry: tasks/jobs/registry.py)."""

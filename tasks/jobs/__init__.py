"""The built-in jobs, one module each (the registry: tasks/registry.py)."""

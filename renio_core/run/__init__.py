"""``renio run``: the on-policy loop (loop.py), its configuration (config.py), the models it
keeps loaded (resident.py) and its records on disk (records.py)."""

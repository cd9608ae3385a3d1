"""The job file: schema (schema.py), reading and substitution (loader.py)."""

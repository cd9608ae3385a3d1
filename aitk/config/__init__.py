"""The job file: schema (schema.py), loading (loader.py: text.py, errors.py, keys.py), support table (support.py)."""

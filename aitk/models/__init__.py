"""Model adapters: one module per architecture family behind the interface in base.py."""

"""Database access: the tables (schema.py, declared once), the engine factory and connect helper, the store."""

"""Database access: the engine factory and the store (atomic, idempotent writes)."""

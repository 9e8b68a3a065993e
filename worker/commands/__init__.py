"""The commands, one module per command or group. Each module's ``register`` adds its parser and the
function that runs it; the functions return an exit code or raise the typed errors of worker/errors.py,
and worker/cli.py alone turns an error into one line and a code (docs/cli.md, "Exit codes")."""

from __future__ import annotations

# In the order `--help` lists them.
MODULES = ("migrate", "backfill", "run", "demo", "local", "reprocess", "report", "submit", "lifecycle", "dlq",
           "jobs", "events")

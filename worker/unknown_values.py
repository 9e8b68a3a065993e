"""Enumeration values newer than this version: counted and logged in the process that writes the rows.

The normalizer stores such values as sent (see normalize._new_value) and reports them per page; pages
are normalized in a decoding process, whose metrics nobody scrapes and whose log lines would repeat
per page, so the worker process counts them here. The metric counts by member only (the value comes from
AWS and would mint a series per value); each value is logged once per process, truncated, and the number
of values remembered is bounded, so a hostile page can flood neither the metrics nor the log.
"""

from __future__ import annotations

from worker import metrics
from worker.logs import get_logger
from worker.normalize import UnknownValues

log = get_logger(__name__)

# A log field carries at most this much of a value.
MAX_LOGGED_CHARS = 64
# Distinct (member, value) pairs logged per process; later ones are counted, and announced once.
MAX_DISTINCT = 100


class Reporter:
    """Counts and logs unknown values; the worker process has one (:func:`report`)."""

    def __init__(self, max_distinct: int = MAX_DISTINCT) -> None:
        self.max_distinct = max_distinct
        self._logged: set[tuple[str, str]] = set()
        self._told_full = False

    def report(self, unknown: UnknownValues) -> None:
        """Count one page's values in the metric; log each value the first time this reporter sees it."""
        for member, values in unknown.items():
            for value, count in values.items():
                metrics.UNKNOWN_VALUES.labels(member).inc(count)
                self._log_first(member, value)

    def _log_first(self, member: str, value: str) -> None:
        logged = value[:MAX_LOGGED_CHARS]
        if (member, logged) in self._logged:
            return
        if len(self._logged) >= self.max_distinct:
            if not self._told_full:
                self._told_full = True
                log.warning("too many distinct unknown enumeration values to log one by one; "
                            "further ones are only counted", member=member)
            return
        self._logged.add((member, logged))
        log.warning("enumeration value unknown to this version, stored as sent",
                    member=member, value=logged, truncated=len(value) > MAX_LOGGED_CHARS)


_reporter = Reporter()


def report(unknown: UnknownValues) -> None:
    """:meth:`Reporter.report` with this process's reporter."""
    _reporter.report(unknown)

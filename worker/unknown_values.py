"""Enumeration values newer than this version: counted and logged in the process that writes the rows.

The normalizer stores such values as sent (see normalize._new_value) and reports them per page; pages
are normalized in a decoding process, whose metrics nobody scrapes and whose log lines would repeat
per page, so the worker process counts them here. Each value is logged once per process; values are
truncated and their number bounded, so a hostile page cannot flood the metrics or the log.
"""

from __future__ import annotations

from worker import metrics
from worker.logs import get_logger
from worker.normalize import OTHER, UnknownValues

log = get_logger(__name__)

# A metric label and a log field carry at most this much of a value.
MAX_LABEL_CHARS = 64
# Distinct (member, value) label pairs per process; later ones are counted under OTHER.
MAX_DISTINCT = 100


class Reporter:
    """Counts and logs unknown values; the worker process has one (:func:`report`)."""

    def __init__(self, max_distinct: int = MAX_DISTINCT) -> None:
        self.max_distinct = max_distinct
        self._labelled: set[tuple[str, str]] = set()

    def report(self, unknown: UnknownValues) -> None:
        """Count one page's values in the metric; log each value the first time this reporter sees it."""
        for member, values in unknown.items():
            for value, count in values.items():
                label = value[:MAX_LABEL_CHARS]
                if (member, label) not in self._labelled and len(self._labelled) >= self.max_distinct:
                    label = OTHER
                if (member, label) not in self._labelled:
                    self._labelled.add((member, label))
                    if label == OTHER:
                        log.warning("too many distinct unknown enumeration values to label one by one; "
                                    f"counting further ones as {OTHER}", member=member)
                    else:
                        log.warning("enumeration value unknown to this version, stored as sent",
                                    member=member, value=label, truncated=len(value) > MAX_LABEL_CHARS)
                metrics.UNKNOWN_VALUES.labels(member, label).inc(count)


_reporter = Reporter()


def report(unknown: UnknownValues) -> None:
    """:meth:`Reporter.report` with this process's reporter."""
    _reporter.report(unknown)

"""Job events: the outbox that triggers fill (migration 0014), its publisher, and `events list|replay`.

The data flows one way: a change to a job commits with its event row (``event_outbox``, written by a
trigger in the same transaction) -> NOTIFY on :data:`CHANNEL` at commit -> the publisher claims the oldest
undelivered events (``FOR UPDATE SKIP LOCKED``, the first undelivered one per job) -> SNS Publish and/or
EventBridge PutEvents -> ``published_at``. A crash before the commit leaves neither change nor event; a
crash after it leaves the event pending, delivered later; a crash after the publish and before
``published_at`` is written delivers it again, with the same ``event_id``. The contract is docs/events.md.
"""

from __future__ import annotations

# The NOTIFY channel of every event written (its payload: the event_id), at the commit of its transaction.
CHANNEL = "rekognition_job_events"
EVENT_TYPES = ("job.ingested", "job.failed", "job.deleted", "identity.erased")
# EventBridge's Source of every event.
EVENT_SOURCE = "rekognition-video-worker"

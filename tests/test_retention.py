from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone

from events_app.models import Event
from events_app.services import history, prune_expired, publish
from sessions_app.models import Session


def _publish_many(session: Any, n: int) -> None:
    for i in range(n):
        publish(session.id, "task.progress", {"step": i})


def test_count_retention_keeps_the_newest_events_and_never_reuses_seqs(shared_session: Any, settings: Any) -> None:
    settings.TANDEM_EVENT_RETENTION_COUNT = 5
    _publish_many(shared_session, 12)
    head = Session.objects.get(pk=shared_session.pk).last_seq
    seqs = list(Event.objects.filter(session=shared_session).values_list("seq", flat=True))
    assert seqs == list(range(head - 4, head + 1))
    publish(shared_session.id, "task.progress", {"step": "next"})
    assert Event.objects.filter(session=shared_session).order_by("-seq").first().seq == head + 1


def test_age_retention_prunes_old_events_and_history_reports_reset(shared_session: Any, settings: Any) -> None:
    settings.TANDEM_EVENT_RETENTION_SECONDS = 60
    _publish_many(shared_session, 3)
    Event.objects.filter(session=shared_session).update(created_at=timezone.now() - timedelta(seconds=120))
    publish(shared_session.id, "task.progress", {"step": "fresh"})
    assert prune_expired() >= 3
    head = Session.objects.get(pk=shared_session.pk).last_seq
    assert list(Event.objects.filter(session=shared_session).values_list("seq", flat=True)) == [head]
    gone = history(shared_session.id, head, after=0, limit=100, type_filter=None)
    assert gone.reset is True and gone.envelopes == []
    latest = history(shared_session.id, head, after=head - 1, limit=100, type_filter=None)
    assert latest.reset is False and len(latest.envelopes) == 1

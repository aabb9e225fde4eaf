"""How many SQL statements a message post and an echo turn cost (a count, not a time)."""
from __future__ import annotations

from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from sessions_app import services
from tests.replies import post

pytestmark = [pytest.mark.django_db(transaction=True)]


def test_count(shared_session: Any, bob: Any, settings: Any) -> None:
    settings.TANDEM_AGENT_MODE = "worker"
    with CaptureQueriesContext(connection) as q_post:
        response = post(bob, shared_session.id, "hi")
    assert response.status_code == 202
    reply_id = response.json()["reply_id"]
    with CaptureQueriesContext(connection) as q_claim:
        [run] = services.claim_runs("r", 10)
        services.abort_requested(reply_id)
        services.reply_context(shared_session.id, reply_id)
    with CaptureQueriesContext(connection) as q_start:
        part = services.start_part(reply_id, shared_session.id, 0, "text")
    with CaptureQueriesContext(connection) as q_delta:
        services.append_text(part.id, "text", reply_id, shared_session.id, "hi", "hi")
    with CaptureQueriesContext(connection) as q_finish:
        services.finish_reply(shared_session.id, reply_id, runner="r", status="completed", text_parts=[(part.id, "hi")])
    for name, q in [("post", q_post), ("claim", q_claim), ("start", q_start), ("delta", q_delta), ("finish", q_finish)]:
        print("=====", name, len(q.captured_queries))
        for x in q.captured_queries:
            print("   ", x["sql"][:300])

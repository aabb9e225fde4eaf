"""Search across the sessions a user belongs to, by title and message text.

On PostgreSQL: full-text search (``english`` configuration, so "running" finds "run"),
ranked with ``ts_rank`` and cut into snippets by ``ts_headline``, using the GIN indexes
of migration 0005 (the expressions here must stay exactly as that migration writes
them). Elsewhere (SQLite): a case-insensitive substring match, ranked by how often the
text contains the query, with a snippet cut around the first match.

A hit's ``snippet`` is plain text and ``highlights`` the ``[start, end)`` code-point
ranges in it that matched: clients mark them without ever treating user text as HTML.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.contrib.postgres.search import SearchHeadline, SearchQuery, SearchRank, SearchVector
from django.db import connection
from django.db.models import F, QuerySet, Value
from django.db.models.functions import Replace

from sessions_app.models import Membership, Part, Session

SEARCH_CONFIG = "english"
TITLE_WEIGHT = 2.0  # a title names what a whole session is about
SNIPPET_CHARS = 160
# ts_headline marks matches with these; they are control characters that no snippet
# keeps (any already in the text are removed before the headline is made).
_START, _STOP = "\x02", "\x03"
# ts_headline drops what its parser takes for HTML tags, so a snippet would not show
# what was written: "<" goes in as this and comes back out as "<".
_LT = "\x01"


@dataclass(frozen=True)
class Hit:
    session_id: str
    session_title: str
    message_id: str | None
    snippet: str
    highlights: list[list[int]]
    created_at: datetime
    rank: float
    order: str  # ties broken by this, newest first: the same order on every page

    def to_json(self) -> dict[str, Any]:
        from events_app.types import iso

        return {
            "session": {"id": self.session_id, "title": self.session_title},
            "message_id": self.message_id,
            "snippet": self.snippet,
            "highlights": self.highlights,
            "created_at": iso(self.created_at),
        }


def search(user_id: int, q: str, *, offset: int, limit: int) -> tuple[list[Hit], bool]:
    """The hits ranked ``offset`` to ``offset + limit`` for the user, best first, and
    whether there are more."""
    want = offset + limit + 1
    session_ids = Membership.objects.filter(user_id=user_id).values("session_id")
    if connection.vendor == "postgresql":
        titles, texts = _postgres(session_ids, q, want)
    else:
        titles, texts = _substring(session_ids, q, want)
    hits = sorted([*titles, *texts], key=lambda h: (-h.rank, -h.created_at.timestamp(), h.order))
    return hits[offset : offset + limit], len(hits) > offset + limit


# ---------------------------------------------------------------- PostgreSQL


def _vector(column: str) -> SearchVector:
    # Compiles to to_tsvector('english'::regconfig, COALESCE(column, '')): the indexed expression.
    return SearchVector(column, config=SEARCH_CONFIG)


def _postgres(session_ids: QuerySet[Any], q: str, want: int) -> tuple[list[Hit], list[Hit]]:
    query = SearchQuery(q, config=SEARCH_CONFIG, search_type="websearch")
    headline_options: dict[str, Any] = {
        "config": SEARCH_CONFIG, "start_sel": _START, "stop_sel": _STOP,
        "max_words": 30, "min_words": 12, "highlight_all": False,
    }
    sessions = (
        Session.objects.filter(pk__in=session_ids)
        .annotate(match=_vector("title"))
        .filter(match=query)
        .annotate(
            rank=SearchRank(_vector("title"), query),
            headline=SearchHeadline(_as_written("title"), query, **{**headline_options, "highlight_all": True}),
        )
        .order_by("-rank", "-created_at", "id")
        .values_list("id", "title", "headline", "created_at", "rank")[:want]
    )
    titles = [
        Hit(sid, title, None, *_marked(headline), created, float(rank) * TITLE_WEIGHT, sid)
        for sid, title, headline, created, rank in sessions
    ]
    parts = (
        Part.objects.filter(message__session_id__in=session_ids, type=Part.PartType.TEXT)
        .annotate(match=_vector("text"))
        .filter(match=query)
        .annotate(
            rank=SearchRank(_vector("text"), query),
            headline=SearchHeadline(_as_written("text"), query, **headline_options),
            created=F("message__created_at"),
        )
        .order_by("-rank", "-created", "message_id", "index")
        .values_list(
            "message__session_id", "message__session__title", "message_id", "headline", "created", "rank"
        )
    )
    texts = _first_per_message(
        Hit(sid, title, mid, *_marked(headline), created, float(rank), mid)
        for sid, title, mid, headline, created, rank in _chunks(parts)
    )
    return titles, _take(texts, want)


def _as_written(column: str) -> Replace:
    """The column for ts_headline: no mark characters, and no "<" for it to take a tag from."""
    text: F | Replace = F(column)
    for char in (_START, _STOP, _LT):
        text = Replace(text, Value(char), Value(""))
    return Replace(text, Value("<"), Value(_LT))


def _marked(headline: str) -> tuple[str, list[list[int]]]:
    """ts_headline's output with its marks turned into code-point ranges."""
    snippet: list[str] = []
    ranges: list[list[int]] = []
    start: int | None = None
    for char in headline:
        if char == _START:
            start = len(snippet)
        elif char == _STOP:
            if start is not None and start < len(snippet):
                ranges.append([start, len(snippet)])
            start = None
        else:
            snippet.append("<" if char == _LT else char)
    return "".join(snippet), ranges


# ---------------------------------------------------------------- other databases


def _substring(session_ids: QuerySet[Any], q: str, want: int) -> tuple[list[Hit], list[Hit]]:
    needle = q.strip()
    titles = [
        Hit(sid, title, None, *_cut(title, needle, whole=True), created, _count(title, needle) * TITLE_WEIGHT, sid)
        for sid, title, created in Session.objects.filter(pk__in=session_ids, title__icontains=needle)
        .values_list("id", "title", "created_at")
    ]
    parts = (
        Part.objects.filter(
            message__session_id__in=session_ids, type=Part.PartType.TEXT, text__icontains=needle
        )
        .order_by("-message__created_at", "message_id", "index")
        .values_list("message__session_id", "message__session__title", "message_id", "text", "message__created_at")
    )
    texts = list(
        _first_per_message(
            Hit(sid, title, mid, *_cut(text, needle), created, float(_count(text, needle)), mid)
            for sid, title, mid, text, created in _chunks(parts)
        )
    )
    # Ranked in Python: SQLite has no rank; the whole match set is read (small databases).
    texts.sort(key=lambda h: (-h.rank, -h.created_at.timestamp(), h.order))
    return titles, texts[:want]


def _count(text: str, needle: str) -> int:
    return text.casefold().count(needle.casefold())


def _cut(text: str, needle: str, *, whole: bool = False) -> tuple[str, list[list[int]]]:
    """About SNIPPET_CHARS of ``text`` around the first match, with every match in it."""
    pattern = re.compile(re.escape(needle), re.IGNORECASE)
    first = pattern.search(text)
    snippet = text
    if not whole and first is not None and len(text) > SNIPPET_CHARS:
        begin = max(0, first.start() - SNIPPET_CHARS // 3)
        end = min(len(text), begin + SNIPPET_CHARS)
        begin = max(0, min(begin, end - SNIPPET_CHARS))
        snippet = ("…" if begin else "") + text[begin:end] + ("…" if end < len(text) else "")
    snippet = " ".join(snippet.split())  # one line, as a headline is
    return snippet, [[m.start(), m.end()] for m in pattern.finditer(snippet)]


# ---------------------------------------------------------------- shared


def _chunks(rows: QuerySet[Any], size: int = 200) -> Iterator[Any]:
    start = 0
    while True:
        chunk = list(rows[start : start + size])
        yield from chunk
        if len(chunk) < size:
            return
        start += size


def _first_per_message(hits: Iterable[Hit]) -> Iterator[Hit]:
    """A message with several matching text parts is one hit: its best one."""
    seen: set[str | None] = set()
    for hit in hits:
        if hit.message_id not in seen:
            seen.add(hit.message_id)
            yield hit


def _take(hits: Iterator[Hit], count: int) -> list[Hit]:
    taken: list[Hit] = []
    for hit in hits:
        taken.append(hit)
        if len(taken) >= count:
            break
    return taken

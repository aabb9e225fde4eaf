"""Where a fork came from, and the full-text indexes search uses on PostgreSQL.

The indexes are on expressions that must be written exactly as the queries in
``sessions_app.search`` write them (``SEARCH_CONFIG``, ``COALESCE``), or PostgreSQL will
not use them. Other databases (SQLite) search without an index.
"""
from __future__ import annotations

from typing import Any

from django.db import migrations, models

INDEXES = {
    "sessions_app_part_text_fts": ("sessions_app_part", "text"),
    "sessions_app_session_title_fts": ("sessions_app_session", "title"),
}


def create_indexes(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    for name, (table, column) in INDEXES.items():
        schema_editor.execute(
            f"CREATE INDEX IF NOT EXISTS {name} ON {table} USING gin "
            f"(to_tsvector('english'::regconfig, COALESCE({column}, ''::text)))"
        )


def drop_indexes(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor != "postgresql":
        return
    for name in INDEXES:
        schema_editor.execute(f"DROP INDEX IF EXISTS {name}")


class Migration(migrations.Migration):
    dependencies = [
        ("sessions_app", "0004_queue_retry"),
    ]

    operations = [
        migrations.AddField(
            model_name="session",
            name="forked_from_message_id",
            field=models.CharField(blank=True, default="", max_length=32),
        ),
        migrations.AddField(
            model_name="session",
            name="forked_from_session_id",
            field=models.CharField(blank=True, default="", max_length=32),
        ),
        migrations.RunPython(create_indexes, drop_indexes, elidable=False),
    ]

"""Queued messages and retried replies: a message's turn in the conversation, the
``queued`` status and ``superseded_by``."""
from __future__ import annotations

from typing import Any

import django.db.models.deletion
import django.utils.timezone
from django.db import migrations, models


def turn_from_creation(apps: Any, schema_editor: Any) -> None:
    # Until now every message took its turn when it was posted.
    Message = apps.get_model("sessions_app", "Message")
    Message.objects.update(turn_at=models.F("created_at"))


class Migration(migrations.Migration):

    dependencies = [
        ("sessions_app", "0003_replyrun_started_at"),
    ]

    operations = [
        migrations.AddField(
            model_name="message",
            name="turn_at",
            field=models.DateTimeField(default=django.utils.timezone.now),
        ),
        migrations.RunPython(turn_from_creation, migrations.RunPython.noop),
        migrations.AddField(
            model_name="message",
            name="superseded_by",
            field=models.ForeignKey(
                blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL,
                related_name="+", to="sessions_app.message",
            ),
        ),
        migrations.AlterField(
            model_name="message",
            name="status",
            field=models.CharField(
                choices=[
                    ("queued", "Queued"), ("streaming", "Streaming"), ("completed", "Completed"),
                    ("cancelled", "Cancelled"), ("error", "Error"),
                ],
                max_length=16,
            ),
        ),
        migrations.AlterModelOptions(name="message", options={"ordering": ["turn_at", "id"]}),
        migrations.AddIndex(
            model_name="message",
            index=models.Index(fields=["session", "turn_at"], name="sessions_ap_session_turn_idx"),
        ),
        migrations.AddIndex(
            model_name="message",
            index=models.Index(fields=["session", "status"], name="sessions_ap_session_status_idx"),
        ),
    ]

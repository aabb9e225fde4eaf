"""Users change outside Tandem's services — the admin, ``manage.py shell``, a script — so
their deactivation and deletion are caught here, wherever they happen. ``QuerySet.update()``
sends no signal: deactivate users with ``save()``."""
from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.db.models.signals import post_save, pre_delete

from sessions_app import services


def _on_user_saved(sender: Any, instance: Any, created: bool, update_fields: Any = None, **kwargs: Any) -> None:
    if created or instance.is_active:
        return
    if update_fields is not None and "is_active" not in update_fields:
        return  # saved without touching is_active (an inactive user's last_login, say)
    services.end_streams_of_user(instance.pk)


def _on_user_deleted(sender: Any, instance: Any, **kwargs: Any) -> None:
    services.end_streams_of_user(instance.pk, deleting=True)


def connect() -> None:
    user_model = get_user_model()
    post_save.connect(_on_user_saved, sender=user_model, dispatch_uid="tandem.user_saved")
    pre_delete.connect(_on_user_deleted, sender=user_model, dispatch_uid="tandem.user_deleted")

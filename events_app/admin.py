"""A read-only view of the event log. Events are written only by
``events_app.services.publish`` and removed only by retention, so the admin can neither
add, change nor delete them."""
from __future__ import annotations

import json
from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.utils.html import format_html

from events_app.models import Event


@admin.register(Event)
class EventAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ("seq", "session", "type", "created_at")
    list_display_links = ("seq",)
    list_filter = ("type",)
    # "=session__id" is an exact match, so a search by session id uses the index.
    search_fields = ("=session__id", "type")
    list_select_related = ("session",)
    ordering = ("-id",)
    # The log can hold millions of rows: skip the second, unfiltered COUNT(*).
    show_full_result_count = False
    fields = ("session", "seq", "type", "created_at", "pretty_envelope")
    readonly_fields = fields

    @admin.display(description="envelope")
    def pretty_envelope(self, obj: Event) -> str:
        try:
            text = json.dumps(json.loads(obj.envelope), indent=2, ensure_ascii=False)
        except ValueError:
            text = obj.envelope
        return format_html('<pre style="white-space: pre-wrap">{}</pre>', text)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

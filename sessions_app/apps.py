from __future__ import annotations

from django.apps import AppConfig


class SessionsAppConfig(AppConfig):
    name = "sessions_app"
    label = "sessions_app"
    verbose_name = "Sessions"

    def ready(self) -> None:
        from sessions_app import doc_tools, signals
        from sessions_app.agents import pool

        signals.connect()
        pool.register()
        doc_tools.register()

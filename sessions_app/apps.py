from __future__ import annotations

from django.apps import AppConfig


class SessionsAppConfig(AppConfig):
    name = "sessions_app"
    label = "sessions_app"
    verbose_name = "Sessions"

    def ready(self) -> None:
        from project import auth
        from sessions_app import doc_tools, keys, signals
        from sessions_app.agents import pool

        auth.register_key_reader(keys.key_owner)
        signals.connect()
        pool.register()
        doc_tools.register()

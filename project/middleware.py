"""Django's own middleware, run synchronously. Under ASGI Django runs an async-capable
middleware in async mode when the handler inside it is async, and then every
``process_request``/``process_response`` of it is a ``sync_to_async`` hop to the
request's thread and back. Below the sync-only middleware (ours, WhiteNoise), the six of
these made a request cross between the event loop and its thread about twenty times,
each crossing a GIL hand-off that the server's event loop (every open stream) waits on
(docs/PERFORMANCE.md, "Issue 12: message posts"). Declared sync-only, they run in the
request's thread with the rest of the chain, which then enters the loop only to reach
the view. Their behaviour is Django's, unchanged."""
from __future__ import annotations

from django.contrib.auth.middleware import AuthenticationMiddleware as _Authentication
from django.contrib.messages.middleware import MessageMiddleware as _Message
from django.contrib.sessions.middleware import SessionMiddleware as _Session
from django.middleware.clickjacking import XFrameOptionsMiddleware as _XFrameOptions
from django.middleware.common import CommonMiddleware as _Common
from django.middleware.csrf import CsrfViewMiddleware as _CsrfView


class SessionMiddleware(_Session):
    async_capable = False


class CommonMiddleware(_Common):
    async_capable = False


class CsrfViewMiddleware(_CsrfView):
    async_capable = False


class AuthenticationMiddleware(_Authentication):
    async_capable = False


class MessageMiddleware(_Message):
    async_capable = False


class XFrameOptionsMiddleware(_XFrameOptions):
    async_capable = False

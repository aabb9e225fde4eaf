"""Tandem's Python client (``Client``, ``AsyncClient``) and the ``tandem`` command line."""
from tandem_client.sdk import (
    AsyncClient,
    AsyncEventStream,
    AuthenticationError,
    Client,
    ConflictError,
    DocEdit,
    Document,
    Event,
    EventPage,
    EventStream,
    Member,
    Message,
    NetworkError,
    NotFoundError,
    Permission,
    PermissionDeniedError,
    PostedMessage,
    RateLimitedError,
    ServerError,
    Session,
    TandemError,
    Tokens,
    User,
    ValidationError,
)

__all__ = [
    "AsyncClient", "AsyncEventStream", "AuthenticationError", "Client", "ConflictError", "DocEdit", "Document", "Event",
    "EventPage",
    "EventStream", "Member", "Message", "NetworkError", "NotFoundError", "Permission", "PermissionDeniedError",
    "PostedMessage", "RateLimitedError", "ServerError", "Session", "TandemError", "Tokens", "User", "ValidationError",
]

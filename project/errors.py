"""One error hierarchy and the one place it is rendered.

Every non-2xx JSON response is ``{"error": {"code", "message", "details"}}``: DRF views
through ``drf_exception_handler``, Django's own 404/500 under ``/api/`` through
``ApiErrorMiddleware``, and the stream consumers through ``error_body``.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import orjson
from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import Http404, HttpRequest, HttpResponse
from rest_framework import exceptions as drf
from rest_framework.parsers import JSONParser
from rest_framework.response import Response

log = logging.getLogger(__name__)


class ApiError(Exception):
    code = "bad_request"
    status = 400
    default_message = "The request is not valid."

    def __init__(
        self,
        message: str | None = None,
        *,
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.details = details or {}
        self.headers = headers or {}
        super().__init__(self.message)

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.details)


class BadRequest(ApiError):
    pass


class ValidationFailed(ApiError):
    code = "validation_error"
    default_message = "Some fields are not valid."


class NotAuthenticated(ApiError):
    code, status = "not_authenticated", 401
    default_message = "Authentication credentials were not provided."


class AuthenticationFailed(ApiError):
    code, status = "authentication_failed", 401
    default_message = "The credentials are not valid or have expired."


class PermissionDenied(ApiError):
    code, status = "permission_denied", 403
    default_message = "Your role does not allow this."


class NotFound(ApiError):
    code, status = "not_found", 404
    default_message = "Not found."


class Conflict(ApiError):
    code, status = "conflict", 409
    default_message = "The request conflicts with the current state."


class SessionBusy(Conflict):
    code = "session_busy"
    default_message = "A reply is already streaming in this session."


class QueueFull(Conflict):
    code = "queue_full"
    default_message = "This session's queue of messages is full."


class NotQueued(Conflict):
    code = "not_queued"
    default_message = "This message is no longer queued."


class NotLatest(Conflict):
    code = "not_latest"
    default_message = "Only the session's latest reply can be retried."


class AlreadyResolved(Conflict):
    code = "already_resolved"
    default_message = "This permission request has already been answered."


class VersionConflict(Conflict):
    code = "version_conflict"
    default_message = "The document has changed since that version."


class RequestTimeout(ApiError):
    code, status = "request_timeout", 408
    default_message = "The request body did not arrive in time."


class PayloadTooLarge(ApiError):
    code, status = "payload_too_large", 413
    default_message = "The request body is too large."


class UnsupportedMediaType(ApiError):
    code, status = "unsupported_media_type", 415
    default_message = "Send the body as application/json."


class RateLimited(ApiError):
    code, status = "rate_limited", 429
    default_message = "Too many requests; slow down."


class TooManyConnections(ApiError):
    code, status = "too_many_connections", 429
    default_message = "Too many open streams for this user."


class InternalError(ApiError):
    code, status = "internal_error", 500
    default_message = "Something went wrong on our side."


class Unavailable(ApiError):
    code, status = "unavailable", 503
    default_message = "The service is temporarily unavailable."


def error_body(code: str, message: str, details: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details or {}}}


def error_response(exc: ApiError) -> HttpResponse:
    response = HttpResponse(
        orjson.dumps(exc.body()), status=exc.status, content_type="application/json"
    )
    for name, value in exc.headers.items():
        response[name] = value
    return response


def api_not_found(request: HttpRequest, *args: object, **kwargs: object) -> HttpResponse:
    """The view of every unknown ``/api/`` URL."""
    return error_response(NotFound("No such endpoint."))


_DRF_CODES: list[tuple[type[drf.APIException], type[ApiError]]] = [
    (drf.NotAuthenticated, NotAuthenticated),
    (drf.AuthenticationFailed, AuthenticationFailed),
    (drf.PermissionDenied, PermissionDenied),
    (drf.NotFound, NotFound),
    (drf.UnsupportedMediaType, UnsupportedMediaType),
    (drf.ParseError, BadRequest),
    (drf.MethodNotAllowed, BadRequest),
    (drf.NotAcceptable, BadRequest),
]


def _flatten(detail: Any) -> Any:
    if isinstance(detail, dict):
        return {str(k): _flatten(v) for k, v in detail.items()}
    if isinstance(detail, list):
        return [_flatten(v) for v in detail]
    return str(detail)


def _message(detail: Any) -> str:
    """simplejwt puts a dict ({"detail": ..., "messages": [...]}) where DRF has a string."""
    if isinstance(detail, dict):
        detail = detail.get("detail", "")
    return str(detail)


def to_api_error(exc: Exception) -> ApiError | None:
    """Map DRF's and Django's exceptions onto ours; None for anything unexpected."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, Http404):
        return NotFound()
    if isinstance(exc, RequestDataTooBig):
        return PayloadTooLarge()
    if isinstance(exc, drf.ValidationError):
        detail = exc.detail
        if isinstance(detail, dict):
            return ValidationFailed(details=_flatten(detail))
        return ValidationFailed(details={"non_field_errors": _flatten(detail)})
    if isinstance(exc, drf.Throttled):
        # DRF sets ``wait`` in Throttled.__init__; its stubs do not declare it.
        exc_wait: float | None = getattr(exc, "wait", None)
        wait = int(exc_wait or 1) if exc_wait is not None else 1
        return RateLimited(
            f"Too many requests; retry in {wait} s.", headers={"Retry-After": str(max(wait, 1))}
        )
    for drf_type, ours in _DRF_CODES:
        if isinstance(exc, drf_type):
            err = ours(_message(exc.detail))
            if isinstance(exc, drf.MethodNotAllowed):
                err.status, err.code = 405, "method_not_allowed"
            if isinstance(exc, drf.NotAcceptable):
                err.status, err.code = 406, "not_acceptable"
            return err
    if isinstance(exc, drf.APIException):
        err = ApiError(str(exc.detail))
        err.status = exc.status_code
        return err
    return None


def drf_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    err = to_api_error(exc)
    if err is None:
        return None  # let ApiErrorMiddleware log it and answer 500 in the error shape
    headers = dict(err.headers)
    if err.status == 401:
        headers.setdefault("WWW-Authenticate", 'Bearer realm="api"')
    return Response(err.body(), status=err.status, headers=headers)


class ApiErrorMiddleware:
    """Under /api/: 404s for unknown URLs, oversized bodies and unhandled exceptions get
    the error shape too. Elsewhere (pages, admin) Django answers as usual."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if not request.path.startswith("/api/"):
            return self.get_response(request)
        length = request.META.get("CONTENT_LENGTH") or "0"
        try:
            too_big = int(length) > settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        except ValueError:
            return error_response(BadRequest("Content-Length is not a number."))
        if too_big:
            return error_response(PayloadTooLarge())
        response = self.get_response(request)
        if response.status_code == 404 and not response.get("Content-Type", "").startswith(
            "application/json"
        ):
            return error_response(NotFound())
        return response

    def process_view(
        self, request: HttpRequest, view_func: Any, args: Any, kwargs: Any
    ) -> HttpResponse | None:
        # Unknown /api/ URLs answer 404 before CsrfViewMiddleware (which runs after us)
        # can turn an unsafe method into Django's HTML 403 page.
        if view_func is api_not_found:
            not_found: HttpResponse = api_not_found(request)
            return not_found
        return None

    def process_exception(self, request: HttpRequest, exc: Exception) -> HttpResponse | None:
        if not request.path.startswith("/api/"):
            return None
        err = to_api_error(exc)
        if err is None:
            log.error("Unhandled error on %s %s", request.method, request.path, exc_info=exc)
            err = InternalError()
        return error_response(err)


class StrictJSONParser(JSONParser):
    """JSON bodies only, and a body must be a JSON object: arrays, strings and numbers at
    the top level are a 400, not a 500 deep inside a serializer."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RequestDataTooBig:
            raise PayloadTooLarge() from None
        except RecursionError:
            raise BadRequest("The request body is nested too deeply.") from None
        return accept_json_object(data)


def accept_json_object(data: Any, what: str = "The request body") -> dict[str, Any]:
    """``data`` (parsed JSON) if it is an object we can store and send on; BadRequest
    otherwise. Valid JSON can still hold lone surrogates ("\\ud800"), integers beyond 64
    bits or absurd nesting: refused here (400) rather than deep inside a database
    driver or encoder (500). WebSocket commands pass through here too (``what``)."""
    if not isinstance(data, dict):
        raise BadRequest(f"{what} must be a JSON object.")
    try:
        orjson.dumps(data)
    except orjson.JSONEncodeError as exc:
        raise BadRequest(f"{what} cannot be accepted: {exc}.") from None
    return data

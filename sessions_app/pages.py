"""The browser pages. They render a shell; the data comes from the same REST API and
streams every other client uses, through ``static/js/tandem.js``."""
from __future__ import annotations

import logging
from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import PasswordResetForm
from django.contrib.auth.models import User
from django.contrib.auth.password_validation import password_validators_help_text_html
from django.contrib.auth.views import LogoutView, PasswordResetView
from django.core.mail import EmailMessage, get_connection
from django.core.mail.backends.base import BaseEmailBackend
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import redirect, render
from django.template import loader
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_POST

from project.errors import Conflict, NotFound, ValidationFailed
from project.middleware import not_found_page
from sessions_app import services
from sessions_app.access import session_for
from sessions_app.agents import registry as agent_registry

log = logging.getLogger(__name__)


@login_required
def sessions_page(request: HttpRequest) -> HttpResponse:
    return render(request, "tandem/sessions.html", _context(request))


@login_required
def session_page(request: HttpRequest, session_id: str) -> HttpResponse:
    try:
        session, role = session_for(request.user, session_id)
    except NotFound:
        # Same answer for "does not exist" and "not yours", as in the API.
        return not_found_page(request)
    return render(request, "tandem/session.html", {
        **_context(request), "session": session, "role": role,
        "agent_commands": agent_registry.commands(session.agent),
    })


class ApiKeyForm(forms.Form):
    name = forms.CharField(
        max_length=100, label="Name", help_text="What the key is for: a machine, a tool.",
        widget=forms.TextInput(attrs={"placeholder": "claude code on my laptop"}),
    )


# The key just made, kept in the user's session from the POST until the page shows it
# once: the POST redirects, so reloading the page never makes a second key.
_NEW_KEY = "tandem.new_api_key"


@login_required
def api_keys_page(request: HttpRequest) -> HttpResponse:
    """The user's API keys (``/api/auth/keys/`` in a page): make one, shown this once;
    revoke one. Signed in with the cookie, never with a key, as the API requires."""
    assert isinstance(request.user, User)
    form = ApiKeyForm(request.POST if request.method == "POST" else None)
    if request.method == "POST" and form.is_valid():
        try:
            _, raw = services.create_api_key(request.user, form.cleaned_data["name"])
        except Conflict as exc:
            form.add_error(None, exc.message)
        else:
            request.session[_NEW_KEY] = raw
            return redirect("api_keys")
    return render(request, "tandem/api_keys.html", {
        "form": form, "keys": services.list_api_keys(request.user),
        "made": request.session.pop(_NEW_KEY, None) if request.method == "GET" else None,
    })


@login_required
@require_POST
def revoke_api_key_page(request: HttpRequest, key_id: str) -> HttpResponse:
    assert isinstance(request.user, User)
    try:
        services.revoke_api_key(request.user, key_id)
    except NotFound:
        return not_found_page(request)
    return redirect("api_keys")


class SignupForm(forms.Form):
    """What the page asks for. The rules for the name and the password are
    ``services.create_user``'s, the same as the API's; the form only checks that the two
    passwords match."""

    username = forms.CharField(
        strip=False, help_text="Letters, digits and @/./+/-/_ only.",
        widget=forms.TextInput(attrs={"autocomplete": "username", "autofocus": True}),
    )
    password1 = forms.CharField(
        label="Password", strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        help_text=password_validators_help_text_html(),
    )
    password2 = forms.CharField(
        label="Password confirmation", strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
        help_text="Enter the same password as before, for verification.",
    )

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        first, second = data.get("password1"), data.get("password2")
        if first and second and first != second:
            self.add_error("password2", "The two password fields didn't match.")
        return data


def signup_page(request: HttpRequest) -> HttpResponse:
    next_url = request.POST.get("next") or request.GET.get("next") or "/"
    if not url_has_allowed_host_and_scheme(next_url, {request.get_host()}, request.is_secure()):
        next_url = "/"
    if request.user.is_authenticated:
        # Signed in already: a new account would log this one out behind the user's back.
        return redirect(next_url)
    if not settings.TANDEM_ALLOW_SIGNUP:
        return render(request, "registration/signup_closed.html", status=403)
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        try:
            user = services.create_user(form.cleaned_data["username"], form.cleaned_data["password1"])
        except ValidationFailed as exc:
            # The page shows password problems under the confirmation, as Django's form does.
            for field, messages in exc.details.items():
                form.add_error("password2" if field == "password" else field, messages)
        else:
            login(request, user, backend="django.contrib.auth.backends.ModelBackend")
            return redirect(next_url)
    return render(request, "registration/signup.html", {"form": form, "next": next_url})


def _context(request: HttpRequest) -> dict[str, object]:
    return {
        "max_message_chars": settings.TANDEM_MAX_MESSAGE_CHARS,
        "max_doc_chars": settings.TANDEM_MAX_DOC_CHARS,
        "allow_signup": settings.TANDEM_ALLOW_SIGNUP,
    }


class LogoutPage(LogoutView):
    """``POST /accounts/logout/`` logs out (Django's view). A ``GET`` (a typed or bookmarked
    URL) shows a page with the POST form instead of Django's empty 405: logging out on a
    GET would let any other site log a user out with an image tag."""

    http_method_names = ["get", "post", "options"]

    def get(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
        if request.user.is_authenticated:
            return render(request, "registration/logout_confirm.html")
        return render(request, "registration/logged_out.html")


class PasswordResetMailForm(PasswordResetForm):
    """Django's form, except that a message that cannot be sent raises instead of being
    logged and forgotten (Django then shows "check your email" for a mail that never
    left), and goes out over the connection the page opened."""

    connection: BaseEmailBackend | None = None

    def send_mail(
        self, subject_template_name: str, email_template_name: str, context: dict[str, Any],
        from_email: str | None, to_email: str, html_email_template_name: str | None = None,
    ) -> None:
        subject = "".join(loader.render_to_string(subject_template_name, context).splitlines())
        body = loader.render_to_string(email_template_name, context)
        EmailMessage(subject, body, from_email, [to_email], connection=self.connection).send()


class PasswordResetPage(PasswordResetView):
    """``/accounts/password_reset/``. With email off (``TANDEM_EMAIL_BACKEND=none``) it says
    so instead of showing a form whose mail would never come. A mail server that is down or
    refuses the message gives a 503 page that says the mail was not sent; the connection is
    opened before the address is looked up, so a server that is down gives every address
    the same answer and the page never tells which addresses have accounts."""

    form_class = PasswordResetMailForm
    email_template_name = "registration/password_reset_email.txt"
    subject_template_name = "registration/password_reset_subject.txt"

    def dispatch(self, request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        if settings.TANDEM_EMAIL_BACKEND == "none":
            return render(request, "registration/password_reset_off.html")
        return super().dispatch(request, *args, **kwargs)

    def form_valid(self, form: PasswordResetMailForm) -> HttpResponse:  # type: ignore[override]
        try:
            with get_connection(fail_silently=False) as connection:
                form.connection = connection
                response: HttpResponse = super().form_valid(form)
                return response
        except OSError as exc:  # smtplib's errors, refused connections, TLS failures
            # The class and the server's words; never the message, which holds the link.
            log.warning("password reset mail not sent: %s: %s", type(exc).__name__, exc)
            return render(self.request, "registration/password_reset_failed.html", status=503)

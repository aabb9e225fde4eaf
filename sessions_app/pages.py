"""The browser pages. They render a shell; the data comes from the same REST API and
streams every other client uses, through ``static/js/tandem.js``."""
from __future__ import annotations

from typing import Any

from django import forms
from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.password_validation import password_validators_help_text_html
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme

from project.errors import NotFound, ValidationFailed
from sessions_app import services
from sessions_app.access import session_for


@login_required
def sessions_page(request: HttpRequest) -> HttpResponse:
    return render(request, "tandem/sessions.html", _context(request))


@login_required
def session_page(request: HttpRequest, session_id: str) -> HttpResponse:
    try:
        session, role = session_for(request.user, session_id)
    except NotFound:
        # Same answer for "does not exist" and "not yours", as in the API.
        return render(request, "404.html", status=404)
    return render(
        request, "tandem/session.html", {**_context(request), "session": session, "role": role}
    )


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
    if not settings.TANDEM_ALLOW_SIGNUP:
        return render(request, "registration/signup_closed.html", status=403)
    next_url = request.POST.get("next") or request.GET.get("next") or "/"
    if not url_has_allowed_host_and_scheme(next_url, {request.get_host()}, request.is_secure()):
        next_url = "/"
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


def not_found_page(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return render(request, "404.html", status=404)


def _context(request: HttpRequest) -> dict[str, object]:
    return {
        "max_message_chars": settings.TANDEM_MAX_MESSAGE_CHARS,
        "max_doc_chars": settings.TANDEM_MAX_DOC_CHARS,
        "allow_signup": settings.TANDEM_ALLOW_SIGNUP,
    }

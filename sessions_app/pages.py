"""The browser pages. They render a shell; the data comes from the same REST API and
streams every other client uses, through ``static/js/tandem.js``."""
from __future__ import annotations

from django import forms
from django.conf import settings
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.contrib.auth.forms import UserCreationForm
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.http import url_has_allowed_host_and_scheme

from project.errors import NotFound
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


class SignupForm(UserCreationForm):  # type: ignore[type-arg]
    username = forms.CharField(
        max_length=150, help_text="Letters, digits and @/./+/-/_ only.",
        widget=forms.TextInput(attrs={"autocomplete": "username", "autofocus": True}),
    )


def signup_page(request: HttpRequest) -> HttpResponse:
    if not settings.TANDEM_ALLOW_SIGNUP:
        return render(request, "registration/signup_closed.html", status=403)
    next_url = request.POST.get("next") or request.GET.get("next") or "/"
    if not url_has_allowed_host_and_scheme(next_url, {request.get_host()}, request.is_secure()):
        next_url = "/"
    form = SignupForm(request.POST or None)
    if request.method == "POST" and form.is_valid():
        user = form.save()
        login(request, user, backend="django.contrib.auth.backends.ModelBackend")
        return redirect(next_url)
    return render(request, "registration/signup.html", {"form": form, "next": next_url})


def not_found_page(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    return render(request, "404.html", status=404)


def _context(request: HttpRequest) -> dict[str, object]:
    return {
        "max_message_chars": settings.TANDEM_MAX_MESSAGE_CHARS,
        "allow_signup": settings.TANDEM_ALLOW_SIGNUP,
    }

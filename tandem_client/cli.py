"""The ``tandem`` command: Tandem sessions from a terminal or a script, built on the SDK.

Exit codes: 0 success; 1 the reply ended ``error``/``cancelled`` or the server refused
the request; 2 usage error; 3 authentication failure (or not logged in); 4 the server
could not be reached (or the URL is not usable); 5 not found; 130 interrupted (Ctrl+C)."""
from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any, NoReturn

import click

from tandem_client import config
from tandem_client.sdk import (
    AuthenticationError,
    Client,
    ConflictError,
    Document,
    Event,
    NetworkError,
    NotFoundError,
    TandemError,
    Tokens,
)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_AUTH, EXIT_NETWORK, EXIT_NOT_FOUND, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 5, 130


def exit_code(error: TandemError) -> int:
    if isinstance(error, NetworkError):
        return EXIT_NETWORK
    if isinstance(error, AuthenticationError):
        return EXIT_AUTH
    if isinstance(error, NotFoundError):
        return EXIT_NOT_FOUND
    return EXIT_FAILED


# ---------------------------------------------------------------- helpers


def _out(text: str) -> None:
    # Flushed at once: a reply must show as it streams, also through a pipe.
    sys.stdout.write(text)
    sys.stdout.flush()


def _json_line(data: Any) -> None:
    _out(json.dumps(data, ensure_ascii=False) + "\n")


def _note(text: str) -> None:
    click.echo(text, err=True)


def _compact(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def _client(url: str | None) -> Client:
    saved = config.load()
    api_key = os.environ.get("TANDEM_API_KEY")
    if api_key:
        # A key needs no login: it is sent as it is and never refreshed (a revoked one is
        # refused with the server's own message, exit 3).
        server = url or (saved.url if saved is not None else None)
        if not server:
            raise click.UsageError("TANDEM_API_KEY is set: give the server with --url or TANDEM_URL.")
        return Client(server, access=api_key)
    if saved is None:
        raise AuthenticationError(401, "not_logged_in", "Not logged in: run `tandem login --url URL` first.")

    def keep(tokens: Tokens) -> None:
        if tokens.refresh and tokens.refresh != saved.refresh:  # a server that rotates refresh tokens
            config.save(replace(saved, refresh=tokens.refresh))

    return Client(url or saved.url, refresh=saved.refresh, on_tokens=keep)


@contextmanager
def _about(session_id: str, permission_id: str | None = None) -> Iterator[None]:
    """Turn the server's generic 404 into a message naming what was not found."""
    try:
        yield
    except NotFoundError as exc:
        what = (f"Permission request {permission_id} was not found in session {session_id}" if permission_id
                else f"Session {session_id} was not found")
        raise NotFoundError(404, exc.code, f"{what} (it does not exist, or you are not a member).", exc.details) from None


def _ask(question: str) -> bool:
    # Not click.confirm: it echoes a space to stdout, which would end up in a piped reply.
    sys.stderr.write(f"{question} [y/N]: ")
    sys.stderr.flush()
    answer = sys.stdin.readline()
    if not answer:
        raise click.Abort()
    return answer.strip().lower() in ("y", "yes")


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [headers, *rows]) + "\n"


def _clip(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def url_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--url", envvar="TANDEM_URL", metavar="URL",
                        help="Server URL (default: the one you logged in to; env TANDEM_URL).")(f)


def json_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON for scripts.")(f)


def session_argument(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.argument("session_id", metavar="SESSION")(f)


def _json_object(ctx: click.Context, param: click.Parameter, value: str) -> dict[str, Any]:
    try:
        data = json.loads(value)
    except ValueError as exc:
        raise click.BadParameter(f"not valid JSON ({exc}): {value!r}") from None
    if not isinstance(data, dict):
        raise click.BadParameter(f"must be a JSON object, like '{{\"progress\": 50}}', not {value!r}")
    return data


# ---------------------------------------------------------------- commands


@click.group(
    context_settings={"help_option_names": ["-h", "--help"]},
    epilog="Exit codes: 0 success, 1 the reply ended error/cancelled or the request was refused, "
    "2 usage error, 3 authentication failure, 4 network failure, 5 not found, 130 interrupted.",
)
def cli() -> None:
    """Use Tandem sessions from the terminal. Start with `tandem login`, or set
    TANDEM_API_KEY (and TANDEM_URL) to use an API key instead."""


@cli.command()
@click.option("--url", envvar="TANDEM_URL", metavar="URL", help="Server URL, e.g. http://127.0.0.1:8000.")
@click.option("--username", "-u", help="Prompted for when missing.")
@click.option("--password", "-p", envvar="TANDEM_PASSWORD", help="Prompted for (hidden) when missing; env TANDEM_PASSWORD.")
def login(url: str | None, username: str | None, password: str | None) -> None:
    """Log in and save the server URL and a refresh token (file mode 0600)."""
    saved = config.load()
    url = url or click.prompt("Server URL", default=saved.url if saved else "http://127.0.0.1:8000", err=True)
    username = username or click.prompt("Username", default=saved.username if saved else None, err=True)
    password = password or click.prompt("Password", hide_input=True, err=True)
    with Client(url) as client:
        try:
            tokens = client.login(username, password)
        except AuthenticationError as exc:
            raise AuthenticationError(401, exc.code, f"Login failed for {username!r}: {exc.message}") from None
        path = config.save(config.Config(url=client.url, username=username, refresh=tokens.refresh or ""))
    _out(f"Logged in to {client.url} as {username}.\n")
    _note(f"Saved to {path}")


@cli.command("sessions")
@json_option
@url_option
def sessions_command(as_json: bool, url: str | None) -> None:
    """List your sessions, newest activity first, with their status and your role."""
    with _client(url) as client:
        sessions = client.list_sessions()
    if as_json:
        _json_line([s.raw for s in sessions])
        return
    if not sessions:
        _note("No sessions yet: create one with `tandem new TITLE`.")
        return
    rows = []
    for s in sessions:
        status = s.status_type + (f" (attempt {s.status.get('attempt')})" if s.status_type == "retry" else "")
        rows.append([s.id, _clip(s.title), s.agent, status, s.role or ""])
    _out(_table(["ID", "TITLE", "AGENT", "STATUS", "ROLE"], rows))


@cli.command("new")
@click.argument("title", required=False)
@click.option("--agent", help="echo (default), tools, openai, … as the server offers.")
@json_option
@url_option
def new_command(title: str | None, agent: str | None, as_json: bool, url: str | None) -> None:
    """Create a session; prints its id (the whole session with --json)."""
    with _client(url) as client:
        session = client.create_session(title=title, agent=agent)
    if as_json:
        _json_line(session.raw)
    else:
        _out(session.id + "\n")


class _ChatView:
    """Renders one reply: text deltas to stdout, everything else to stderr."""

    def __init__(
        self, client: Client, session_id: str, reply_id: str | None, as_json: bool, interactive: bool,
        queued_id: str | None = None,
    ) -> None:
        self.client, self.session_id, self.reply_id = client, session_id, reply_id
        self.as_json, self.interactive = as_json, interactive
        self.part_id: str | None = None
        self.line_open = False  # stdout holds text that does not end with a newline
        self.asked: set[str] = set()
        # A queued message: its reply is the assistant message created once its turn
        # comes (message.updated), which the log puts right after.
        self.queued_id = queued_id
        self.turn_came = False

    def _follow_queue(self, event: Event) -> int | None:
        p = event.properties
        if event.type == "message.updated" and p.get("message_id") == self.queued_id:
            self.turn_came = True
        elif event.type == "message.created" and self.turn_came and p.get("message", {}).get("role") == "assistant":
            self.reply_id = p["message"]["id"]
            self.queued_id = None
        elif event.type == "message.removed" and p.get("message_id") == self.queued_id:
            self._say("Your queued message was withdrawn before its turn came.")
            return EXIT_FAILED
        return None

    def _say(self, text: str) -> None:
        if self.line_open and sys.stdout.isatty():  # keep notes off the reply's line on a terminal
            _out("\n")
            self.line_open = False
        _note(text)

    def _text(self, part_id: str, delta: str) -> None:
        if self.part_id not in (None, part_id) and self.line_open:
            _out("\n")  # a new text part starts on its own line
        self.part_id = part_id
        if delta:
            _out(delta)
            self.line_open = not delta.endswith("\n")

    def show(self, event: Event) -> int | None:
        """Render ``event``; the exit code once the reply is over, else None."""
        if self.as_json:
            _json_line(event.raw)
        if self.queued_id is not None:
            return self._follow_queue(event)
        p = event.properties
        mine = p.get("message_id") == self.reply_id
        if event.type == "message.part.updated" and mine and "delta" in p:
            if p.get("part", {}).get("type") == "text" and not self.as_json:
                self._text(p["part"]["id"], p["delta"])
        elif event.type == "tool.status" and mine and not self.as_json:
            line = f"[tool] {p.get('tool')}: {p.get('status')}"
            if p.get("status") == "completed" and "output" in p:
                line += f" -> {_compact(p['output'])}"
            elif p.get("status") == "error" and p.get("error"):
                line += f": {p['error']}"
            self._say(line)
        elif event.type == "permission.requested" and p.get("permission", {}).get("message_id") == self.reply_id:
            self._permission(p["permission"])
        elif event.type == "permission.resolved" and p.get("permission_id") in self.asked and not self.as_json:
            by = p.get("resolved_by")
            who = by.get("username") if isinstance(by, dict) else by
            verdict = "approved" if p.get("approved") else "rejected"
            self._say(f"[permission] {verdict} by {who}" + (f": {p['reason']}" if p.get("reason") else ""))
        elif event.type == "stream.reset":
            self._say("[stream] some events could not be replayed; the reply shown may be incomplete")
        elif event.type == "message.completed" and mine:
            if self.line_open and not self.as_json:
                _out("\n")
            status = p.get("status")
            if status == "completed":
                return EXIT_OK
            error = p.get("error") or {}
            self._say(f"Reply {status}" + (f": {error.get('message')} [{error.get('code')}]" if error else "."))
            return EXIT_FAILED
        return None

    def _permission(self, permission: dict[str, Any]) -> None:
        pid = permission["id"]
        self.asked.add(pid)
        self._say(f"[permission] {permission.get('tool')} wants to run with {_compact(permission.get('input'))} ({pid})")
        if not self.interactive:
            self._say(f"[permission] answer with: tandem approve {self.session_id} {pid} [--reject]")
            return
        approved = _ask("Allow it?")
        try:
            self.client.answer_permission(self.session_id, pid, approved)
        except ConflictError:
            self._say("[permission] someone else answered first")


@cli.command()
@session_argument
@click.argument("text", required=False)
@click.option("--if-busy", type=click.Choice(["queue", "reject", "interrupt"]), default="queue", show_default=True,
              help="While a reply runs: wait in the queue for your turn, give up (exit 1), or interrupt it.")
@json_option
@url_option
def chat(session_id: str, text: str | None, if_busy: str, as_json: bool, url: str | None) -> None:
    """Send TEXT to SESSION and print the reply as it streams (TEXT "-" or none: read
    standard input). While someone else's reply runs the message waits in the session's
    queue, and its own reply is printed when its turn comes. Tool status and permission
    requests go to stderr; on a terminal a permission request can be answered inline.
    Ctrl+C aborts the reply (or withdraws the message while it waits)."""
    if text is None or text == "-":
        if sys.stdin.isatty():
            raise click.UsageError("Give the message as an argument, or pipe it on standard input.")
        text = sys.stdin.read()
    if not text.strip():
        raise click.UsageError("The message is empty.")
    with _client(url) as client, _about(session_id):
        session = client.get_session(session_id)
        events = client.stream(session_id, after=session.last_seq)
        posted = None
        view: _ChatView | None = None
        try:
            # The stream is open (server.connected) before the message is posted, so the
            # reply's first delta cannot be missed; replay from last_seq covers the rest.
            connected = next(events)
            if as_json:
                _json_line(connected.raw)
            posted = client.send_message(session_id, text, if_busy=if_busy)
            view = _ChatView(
                client, session_id, posted.reply_id, as_json, interactive=not as_json and sys.stdin.isatty(),
                queued_id=posted.message.id if posted.queued else None,
            )
            if posted.queued:
                _note(f"[queued: position {posted.position}; the reply starts when its turn comes]")
            for event in events:
                code = view.show(event)
                if code is not None:
                    raise SystemExit(code)
        except (KeyboardInterrupt, click.Abort):
            events.close()
            if view is not None and view.queued_id is not None:
                _note("\nInterrupted: withdrawing the queued message.")
                try:
                    client.withdraw_message(session_id, view.queued_id)
                except ConflictError:  # its turn came meanwhile
                    client.abort(session_id)
            elif posted is not None:
                _note("\nInterrupted: aborting the reply.")
                client.abort(session_id)
            raise SystemExit(EXIT_INTERRUPTED) from None
        finally:
            events.close()
        raise NotFoundError(404, "not_found", "The session was deleted while the reply was streaming.")


@cli.command()
@session_argument
@click.argument("message_id", metavar="MESSAGE", required=False)
@json_option
@url_option
def retry(session_id: str, message_id: str | None, as_json: bool, url: str | None) -> None:
    """Ask for a new reply in place of SESSION's latest one (MESSAGE: its id, by default
    the latest reply) and print it as it streams. The old reply stays, superseded."""
    with _client(url) as client, _about(session_id):
        session = client.get_session(session_id)
        if message_id is None:
            replies = [m for m in client.messages(session_id) if m.role == "assistant"]
            if not replies:
                raise ConflictError(409, "not_latest", "This session has no reply to retry yet.")
            message_id = replies[-1].id
        with client.stream(session_id, after=session.last_seq) as events:
            connected = next(events)
            if as_json:
                _json_line(connected.raw)
            reply_id = client.retry(session_id, message_id)
            view = _ChatView(client, session_id, reply_id, as_json, interactive=not as_json and sys.stdin.isatty())
            try:
                for event in events:
                    code = view.show(event)
                    if code is not None:
                        raise SystemExit(code)
            except KeyboardInterrupt:
                _note("\nInterrupted: aborting the reply.")
                client.abort(session_id)
                raise SystemExit(EXIT_INTERRUPTED) from None
        raise NotFoundError(404, "not_found", "The session was deleted while the reply was streaming.")


@cli.command()
@session_argument
@click.argument("message_id", metavar="MESSAGE")
@url_option
def withdraw(session_id: str, message_id: str, url: str | None) -> None:
    """Take your queued MESSAGE out of SESSION's queue before its turn comes."""
    with _client(url) as client, _about(session_id):
        client.withdraw_message(session_id, message_id)
    _out(f"Withdrew {message_id}.\n")


def _types(values: Sequence[str]) -> str | None:
    return ",".join(t.strip() for value in values for t in value.split(",") if t.strip()) or None


@cli.command()
@session_argument
@click.option("--types", multiple=True, metavar="PATTERNS",
              help="Only these event types: names or prefixes like message.* (comma-separated or repeated).")
@click.option("--after", type=click.IntRange(min=0), help="First replay the events after this seq (0: the whole log).")
@json_option
@url_option
def watch(session_id: str, types: Sequence[str], after: int | None, as_json: bool, url: str | None) -> None:
    """Print SESSION's events as they happen, one per line, until Ctrl+C. Resumes after
    dropped connections and server restarts without printing any event twice."""
    with _client(url) as client, _about(session_id):
        client.get_session(session_id)  # a clear error now rather than retries later
        connections = 0
        try:
            with client.stream(session_id, after=after, types=_types(types)) as stream:
                for event in stream:
                    if event.type == "server.connected":
                        connections += 1
                        if connections > 1:
                            _note(f"[reconnected; resuming after seq {stream.last_seq}]")
                        continue
                    if event.type == "stream.reset":
                        _note(
                            f"[events were lost ({event.properties.get('reason')}); "
                            f"continuing from seq {event.properties.get('last_seq')}]"
                        )
                    if as_json:
                        _json_line(event.raw)
                    else:
                        seq = "-" if event.seq is None else str(event.seq)
                        _out(f"{seq:>6}  {event.time[11:19]}  {event.type}  {_compact(event.properties)}\n")
        except KeyboardInterrupt:
            raise SystemExit(EXIT_INTERRUPTED) from None
        _note("[the session was deleted]")


@cli.command("permissions")
@session_argument
@click.option("--all", "show_all", is_flag=True, help="Also the answered and expired ones.")
@json_option
@url_option
def permissions_command(session_id: str, show_all: bool, as_json: bool, url: str | None) -> None:
    """List SESSION's pending permission requests (answer them with `tandem approve`)."""
    with _client(url) as client, _about(session_id):
        permissions = client.permissions(session_id, status=None if show_all else "pending")
    if as_json:
        _json_line([p.raw for p in permissions])
    elif permissions:
        _out(_table(["ID", "TOOL", "INPUT", "STATUS"], [[p.id, p.tool, _clip(_compact(p.input)), p.status] for p in permissions]))
    else:
        _note("No pending permission requests." if not show_all else "No permission requests.")


@cli.command()
@session_argument
@click.argument("permission_id", metavar="PERMISSION")
@click.option("--reject", is_flag=True, help="Reject instead of approving.")
@click.option("--reason", help="Why; everyone in the session sees it.")
@json_option
@url_option
def approve(session_id: str, permission_id: str, reject: bool, reason: str | None, as_json: bool, url: str | None) -> None:
    """Answer a permission request of SESSION: approve it, or --reject it."""
    with _client(url) as client, _about(session_id, permission_id):
        permission = client.answer_permission(session_id, permission_id, approved=not reject, reason=reason)
    if as_json:
        _json_line(permission.raw)
    else:
        _out(f"{permission.status.capitalize()}: {permission.tool} {_compact(permission.input)} ({permission.id})\n")


@cli.command()
@session_argument
@click.argument("event_type", metavar="TYPE")
@click.argument("properties", required=False, default="{}", callback=_json_object, metavar="[PROPERTIES]")
@json_option
@url_option
def publish(session_id: str, event_type: str, properties: dict[str, Any], as_json: bool, url: str | None) -> None:
    """Publish a custom event (e.g. task.progress '{"progress": 50}') to SESSION."""
    with _client(url) as client, _about(session_id):
        event = client.publish(session_id, event_type, properties)
    if as_json:
        _json_line(event.raw)
    else:
        _out(f"Published {event.type} as seq {event.seq}.\n")


@cli.command()
@session_argument
@click.option("--message", "message_id", metavar="MESSAGE", help="Copy up to and including this message (default: every ended one).")
@click.option("--title", help="The new session's title (default: the source's).")
@json_option
@url_option
def fork(session_id: str, message_id: str | None, title: str | None, as_json: bool, url: str | None) -> None:
    """Start a new session of yours from SESSION's conversation; prints its id."""
    with _client(url) as client:
        try:
            session = client.fork_session(session_id, message_id=message_id, title=title)
        except NotFoundError as exc:
            what = f"Session {session_id}" + (f" or its message {message_id}" if message_id else "")
            raise NotFoundError(404, exc.code, f"{what} was not found (or you are not a member).", exc.details) from None
    if as_json:
        _json_line(session.raw)
    else:
        _out(session.id + "\n")


@cli.command("export")
@session_argument
@click.option("--format", "fmt", type=click.Choice(["markdown", "json"]), default="markdown", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), help="Write to this file instead of stdout.")
@url_option
def export_command(session_id: str, fmt: str, output: str | None, url: str | None) -> None:
    """Print SESSION's whole conversation: a Markdown transcript, or JSON."""
    with _client(url) as client, _about(session_id):
        body = client.export(session_id, fmt)
    if output:
        with open(output, "w", encoding="utf-8") as f:
            f.write(body)
        _note(f"Wrote {output}")
    else:
        _out(body if body.endswith("\n") else body + "\n")


@cli.command("search")
@click.argument("query")
@click.option("--limit", type=click.IntRange(1, 1000), default=20, show_default=True, help="At most this many hits.")
@json_option
@url_option
def search_command(query: str, limit: int, as_json: bool, url: str | None) -> None:
    """Find QUERY in the titles and messages of your sessions, best match first."""
    with _client(url) as client:
        hits = client.search(query, max_results=limit)
    if as_json:
        _json_line([
            {"session": {"id": h.session_id, "title": h.session_title}, "message_id": h.message_id,
             "snippet": h.snippet, "highlights": [list(r) for r in h.highlights], "created_at": h.created_at}
            for h in hits
        ])
        return
    if not hits:
        _note("Nothing found.")
        return
    tty = sys.stdout.isatty()
    for h in hits:
        where = f"{h.session_id} {h.message_id or '(title)'}"
        marked = h.marked("\033[1m", "\033[0m") if tty else h.marked("[", "]")
        _out(f"{where}  {_clip(h.session_title, 30) or '(untitled)'}\n    {marked}\n")


@cli.group("doc")
def doc_group() -> None:
    """SESSION's shared document: print it, replace it, add a paragraph to it."""


def _doc_text(text: str | None, what: str) -> str:
    """TEXT, or standard input when TEXT is "-" or missing."""
    if text is None or text == "-":
        if sys.stdin.isatty():
            raise click.UsageError(f"Give the {what} as an argument, or pipe it on standard input.")
        text = sys.stdin.read()
    return text


def _doc_written(document: Document, as_json: bool) -> None:
    if as_json:
        _json_line(document.raw)
    else:
        _note(f"The document is at version {document.version} ({len(document.text)} characters).")


@doc_group.command("get")
@session_argument
@json_option
@url_option
def doc_get(session_id: str, as_json: bool, url: str | None) -> None:
    """Print SESSION's shared document (Markdown); --json adds its version."""
    with _client(url) as client, _about(session_id):
        document = client.get_doc(session_id)
    if as_json:
        _json_line(document.raw)
    elif document.text:
        _out(document.text if document.text.endswith("\n") else document.text + "\n")


@doc_group.command("set")
@session_argument
@click.argument("text", required=False)
@click.option("--version", "if_version", type=click.IntRange(min=0), metavar="N",
              help="Only if the document is still at version N (else exit 1, version_conflict).")
@json_option
@url_option
def doc_set(session_id: str, text: str | None, if_version: int | None, as_json: bool, url: str | None) -> None:
    """Replace SESSION's shared document with TEXT (TEXT "-" or none: read standard input),
    exactly as given. Editors and owners."""
    body = _doc_text(text, "new text")
    with _client(url) as client, _about(session_id):
        document = client.set_doc(session_id, body, version=if_version)
    _doc_written(document, as_json)


@doc_group.command("append")
@session_argument
@click.argument("text", required=False)
@json_option
@url_option
def doc_append(session_id: str, text: str | None, as_json: bool, url: str | None) -> None:
    """Add TEXT (TEXT "-" or none: read standard input) to SESSION's shared document as a
    new paragraph at the end. Editors and owners."""
    paragraph = _doc_text(text, "paragraph").strip("\n")
    if not paragraph.strip():
        raise click.UsageError("The paragraph is empty.")
    with _client(url) as client, _about(session_id):
        document = client.append_doc(session_id, paragraph)
    _doc_written(document, as_json)


def main(argv: Sequence[str] | None = None) -> NoReturn:
    try:
        code = cli.main(args=argv, prog_name="tandem", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        _note("Interrupted.")
        code = EXIT_INTERRUPTED
    except TandemError as exc:
        _note(f"Error: {exc.message} [{exc.code}]")
        code = exit_code(exc)
    sys.exit(code if isinstance(code, int) else EXIT_OK)

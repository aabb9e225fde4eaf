"""Sessions, their members, messages and message parts. State changes go through
``sessions_app.services``; these classes only describe the data."""
from __future__ import annotations

import secrets
from typing import Any

from django.conf import settings
from django.db import models
from django.utils import timezone


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(10)}"


def new_session_id() -> str:
    return new_id("ses")


def new_message_id() -> str:
    return new_id("msg")


def new_part_id() -> str:
    return new_id("prt")


def idle_status() -> dict[str, Any]:
    return {"type": "idle"}


class Role(models.TextChoices):
    OWNER = "owner"
    EDITOR = "editor"
    VIEWER = "viewer"


ROLE_RANK: dict[str, int] = {Role.VIEWER: 0, Role.EDITOR: 1, Role.OWNER: 2}


class Session(models.Model):
    id = models.CharField(primary_key=True, max_length=32, default=new_session_id, editable=False)
    title = models.CharField(max_length=200, blank=True, default="")
    agent = models.CharField(max_length=32, default="echo")
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="owned_sessions"
    )
    status = models.JSONField(default=idle_status)
    # The head of the event log: bumped in the same transaction that inserts an event,
    # so its row lock is what makes seq contiguous under concurrent writers.
    last_seq = models.BigIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # Not indexed: every event moves it, and an index on it made each of those updates
    # write a new entry into every index of the row (PostgreSQL's HOT updates need no
    # indexed column changed). Lists are per member and small; the admin's sort is rare.
    last_activity_at = models.DateTimeField(auto_now_add=True)
    # Where a fork came from: plain ids, not foreign keys, so a fork outlives its source
    # (deleting the source session leaves the fork, and what it says it came from, alone).
    forked_from_session_id = models.CharField(max_length=32, blank=True, default="")
    forked_from_message_id = models.CharField(max_length=32, blank=True, default="")

    class Meta:
        ordering = ["-last_activity_at"]

    def __str__(self) -> str:
        return self.title or self.id

    @property
    def is_busy(self) -> bool:
        return bool(self.status.get("type", "idle") != "idle")


class Membership(models.Model):
    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=8, choices=Role.choices)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["session", "user"], name="one_membership_per_user")
        ]

    def __str__(self) -> str:
        return f"{self.user} ({self.role}) in {self.session_id}"


class Message(models.Model):
    class MessageRole(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"

    class Status(models.TextChoices):
        QUEUED = "queued"
        STREAMING = "streaming"
        COMPLETED = "completed"
        CANCELLED = "cancelled"
        ERROR = "error"

    id = models.CharField(primary_key=True, max_length=32, default=new_message_id, editable=False)
    # Its lookups lead the indexes below: no index of its own.
    session = models.ForeignKey(
        Session, on_delete=models.CASCADE, related_name="messages", db_index=False
    )
    role = models.CharField(max_length=16, choices=MessageRole.choices)
    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    status = models.CharField(max_length=16, choices=Status.choices)
    error = models.JSONField(null=True, blank=True)
    usage = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(default=timezone.now)
    completed_at = models.DateTimeField(null=True, blank=True)
    # The message's place in the conversation. A queued message is posted before the
    # replies it waits behind but belongs after them, so its turn (not its posting time)
    # orders the transcript: while queued this is its place in the queue, and it is set
    # again when its turn comes.
    turn_at = models.DateTimeField(default=timezone.now)
    # A retried reply stays, pointing at the reply that replaced it.
    superseded_by = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.SET_NULL, related_name="+", db_index=False
    )

    class Meta:
        ordering = ["turn_at", "id"]
        # Every message row is written twice in a turn (posted, completed): only the
        # indexes something reads. A foreign key's own index would come with a second
        # (LIKE) index on PostgreSQL; ids are never searched by prefix.
        indexes = [
            models.Index(fields=["superseded_by"], name="sessions_ap_supersed_idx"),
            models.Index(fields=["session", "created_at"]),
            models.Index(fields=["session", "turn_at"], name="sessions_ap_session_turn_idx"),
            models.Index(fields=["session", "status"], name="sessions_ap_session_status_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.role} message {self.id}"


class Part(models.Model):
    class PartType(models.TextChoices):
        TEXT = "text"
        REASONING = "reasoning"
        TOOL = "tool"

    id = models.CharField(primary_key=True, max_length=32, default=new_part_id, editable=False)
    # Led by the one_part_per_index constraint's index: no index of its own.
    message = models.ForeignKey(Message, on_delete=models.CASCADE, related_name="parts", db_index=False)
    index = models.PositiveIntegerField()
    type = models.CharField(max_length=16, choices=PartType.choices)
    text = models.TextField(blank=True, default="")
    tool = models.CharField(max_length=64, blank=True, default="")
    call_id = models.CharField(max_length=64, blank=True, default="")
    state = models.JSONField(null=True, blank=True)

    class Meta:
        ordering = ["index"]
        constraints = [
            models.UniqueConstraint(fields=["message", "index"], name="one_part_per_index")
        ]

    def __str__(self) -> str:
        return f"{self.type} part {self.index} of {self.message_id}"


def new_permission_id() -> str:
    return new_id("per")


class PermissionRequest(models.Model):
    """An agent's request to run a tool (or an outside agent's question, ``approval``),
    waiting for a human. The status moves from
    ``pending`` exactly once; the conditional UPDATE in the service is what makes the
    first answer win across processes."""

    class Status(models.TextChoices):
        PENDING = "pending"
        APPROVED = "approved"
        REJECTED = "rejected"
        EXPIRED = "expired"

    id = models.CharField(primary_key=True, max_length=32, default=new_permission_id, editable=False)
    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="permissions")
    # None for a question an outside agent asks through MCP's request_approval: no reply
    # of the session's agent is waiting on it.
    message = models.ForeignKey(
        Message, null=True, blank=True, on_delete=models.CASCADE, related_name="permissions"
    )
    call_id = models.CharField(max_length=64)
    tool = models.CharField(max_length=64)
    input = models.JSONField(default=dict)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    approved = models.BooleanField(null=True, blank=True)
    reason = models.TextField(null=True, blank=True)
    resolved_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    # Set when nobody answered in time, or the run that asked went away.
    resolved_by_timeout = models.BooleanField(default=False)
    created_at = models.DateTimeField(default=timezone.now)
    expires_at = models.DateTimeField()
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at", "id"]
        indexes = [models.Index(fields=["session", "status"])]

    def __str__(self) -> str:
        return f"{self.tool} permission {self.id} ({self.status})"


class ReplyRun(models.Model):
    """One reply waiting for, or held by, a runner process: the queue the agent workers
    claim from and the lease that tells a dead runner from a slow one. The row goes
    away when the reply ends."""

    message = models.OneToOneField(
        Message, primary_key=True, on_delete=models.CASCADE, related_name="run"
    )
    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="runs", db_index=False)
    agent = models.CharField(max_length=32)
    runner = models.CharField(max_length=128, blank=True, default="")  # "" = not claimed yet
    lease_until = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)  # when a runner claimed it
    # Read by the runner right after it starts listening for abort, so an abort that
    # arrives before that moment is not lost.
    abort_requested = models.BooleanField(default=False)
    abort_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["created_at"]
        indexes = [
            models.Index(fields=["runner", "lease_until"]),
            models.Index(fields=["session", "created_at"], name="sessions_ap_run_session_idx"),
        ]

    def __str__(self) -> str:
        return f"run of {self.message_id} ({self.runner or 'queued'})"


class Document(models.Model):
    """A session's shared document (PROTOCOL §10), stored as Yjs updates: ``base`` holds
    every update up to ``base_version`` merged into one, and a ``DocUpdate`` row each
    update after it. Storing an update is one small INSERT (and this row's version bump)
    in the transaction that accepts it, so it is durable before anyone is sent it;
    compaction folds the rows into ``base`` later, in the background. The row is made on
    the first change: a session that never had one reads as empty at version 0."""

    session = models.OneToOneField(
        Session, primary_key=True, on_delete=models.CASCADE, related_name="document"
    )
    # Bumped by one for every stored update: the versions of the DocUpdate rows are
    # contiguous, which lets a process that missed a relayed update find it.
    version = models.BigIntegerField(default=0)
    base = models.BinaryField(default=b"")
    base_version = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(default=timezone.now)
    # Who made the latest change, for the doc.updated that announces it.
    last_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    last_by_agent = models.BooleanField(default=False)
    # The newest version doc.updated has announced, and when: events are coalesced to at
    # most one every TANDEM_DOC_EVENT_SECONDS per session.
    event_version = models.BigIntegerField(default=0)
    event_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"document of {self.session_id} (version {self.version})"


class DocUpdate(models.Model):
    """One stored Yjs update of a session's document, not yet compacted into its base."""

    session = models.ForeignKey(Session, on_delete=models.CASCADE, related_name="doc_updates")
    version = models.BigIntegerField()
    data = models.BinaryField()
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["session", "version"]
        constraints = [
            models.UniqueConstraint(fields=["session", "version"], name="one_doc_update_per_version")
        ]

    def __str__(self) -> str:
        return f"update {self.version} of {self.session_id}"


class ApiKey(models.Model):
    """A long-lived credential a user makes for a program (an MCP client's configuration,
    a script): ``Authorization: Bearer tdm_…`` wherever an access token is accepted in
    that header. Only a digest of the key is stored; the key itself is shown once, when
    it is made. Deleting the row revokes it."""

    id = models.CharField(primary_key=True, max_length=32, editable=False)
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_keys")
    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=16)  # the key's first characters, to tell keys apart
    digest = models.CharField(max_length=64, unique=True)  # SHA-256 of the key, hex
    created_at = models.DateTimeField(default=timezone.now)
    # When a request last came with it, to within keys.LAST_USED_PRECISION (a key in use
    # is written at most once per that interval, not once per request); None: never used.
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["user", "created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…) of user {self.user_id}"

"""The yardstick: a stream server of the seed documents' design, to measure Tandem against
on the same machine with the same load tool (``--target peer``).

The design: FastAPI, sse-starlette's ``EventSourceResponse``, and one Redis pattern
subscription per process whose reader puts every message on the bounded
``asyncio.Queue`` of each local connection of that channel. No auth, no persistence, no
resume: it does the least a stream server can, which is what makes it a yardstick.

    GET  /stream/{channel}    text/event-stream: ``event: <event>`` + ``data: <json>``;
                              a ping comment every PEER_PING seconds
    POST /publish/{channel}   {"event": str, "data": ...} -> PUBLISH peer:{channel}
    GET  /stats               connections, channels, messages, deliveries, drops

It needs FastAPI, sse-starlette, uvicorn and redis, which Tandem does not: give it a
virtualenv of its own (``bench/peer-requirements.txt``) and run it from the repository's
root:

    /tmp/seed-peer/bin/uvicorn bench.peer:app --loop uvloop --http httptools --port 8101

It imports nothing of Tandem (tests/test_layers.py).
"""
from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sse_starlette.sse import EventSourceResponse
from starlette.requests import Request

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CHANNEL_PREFIX = os.environ.get("PEER_PREFIX", "peer:")
QUEUE_SIZE = int(os.environ.get("PEER_QUEUE", "1000"))  # per connection; beyond it, dropped
PING_SECONDS = float(os.environ.get("PEER_PING", "30"))

listeners: dict[str, set[asyncio.Queue[dict[str, Any]]]] = {}
counters = {"messages": 0, "deliveries": 0, "dropped": 0}


async def _relay(client: aioredis.Redis) -> None:
    """The process's one subscription: every channel's messages to its local queues."""
    skip = len(CHANNEL_PREFIX)
    while True:
        try:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            await pubsub.psubscribe(f"{CHANNEL_PREFIX}*")
            async for message in pubsub.listen():
                if message["type"] != "pmessage":
                    continue
                name = message["channel"]
                channel = (name.decode() if isinstance(name, bytes) else name)[skip:]
                try:
                    payload = json.loads(message["data"])
                except ValueError:
                    continue
                counters["messages"] += 1
                for queue in tuple(listeners.get(channel, ())):
                    try:
                        queue.put_nowait(payload)
                        counters["deliveries"] += 1
                    except asyncio.QueueFull:
                        counters["dropped"] += 1
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis went away: subscribe again
            print(f"peer: subscription lost: {exc!r}", flush=True)
            await asyncio.sleep(0.5)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    client = aioredis.from_url(REDIS_URL)
    app.state.redis = client
    relay = asyncio.create_task(_relay(client))
    try:
        yield
    finally:
        relay.cancel()
        with suppress(BaseException):
            await relay
        await client.aclose()


app = FastAPI(lifespan=lifespan)


@app.get("/stream/{channel}")
async def stream(channel: str) -> EventSourceResponse:
    queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=QUEUE_SIZE)
    listeners.setdefault(channel, set()).add(queue)

    async def frames() -> AsyncIterator[dict[str, str]]:
        try:
            while True:
                payload = await queue.get()
                yield {"event": str(payload.get("event", "message")), "data": json.dumps(payload.get("data"))}
        finally:
            mine = listeners.get(channel)
            if mine is not None:
                mine.discard(queue)
                if not mine:
                    del listeners[channel]

    return EventSourceResponse(frames(), ping=PING_SECONDS)


@app.post("/publish/{channel}", response_model=None)
async def publish(channel: str, request: Request) -> dict[str, Any] | JSONResponse:
    body = await request.json()
    if not isinstance(body, dict) or not isinstance(body.get("event", "message"), str):
        return JSONResponse({"error": "the body is {event: str, data: ...}"}, status_code=400)
    message = json.dumps({"event": body.get("event", "message"), "data": body.get("data")})
    receivers = await request.app.state.redis.publish(f"{CHANNEL_PREFIX}{channel}", message)
    return {"ok": True, "receivers": receivers}


@app.get("/stats")
async def stats() -> dict[str, Any]:
    return {
        "pid": os.getpid(), "connections": sum(len(q) for q in listeners.values()),
        "channels": len(listeners), **counters,
    }

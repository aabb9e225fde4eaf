"""The process's runtime (project/runtime.py): one per loop serving the app, reached
through one accessor from the loop and from threads, its components made once, and
discarded whole."""
from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest

from project import runtime
from tests.runtime_control import close


def count_makes() -> tuple[runtime.Component[object], list[runtime.Runtime]]:
    made: list[runtime.Runtime] = []

    def make(rt: runtime.Runtime) -> object:
        made.append(rt)
        return object()

    return runtime.Component("test", make), made


async def test_code_on_a_loop_and_threads_outside_it_reach_the_bound_loops_runtime() -> None:
    rt = runtime.bind(asyncio.get_running_loop())
    assert runtime.current() is rt
    assert await asyncio.to_thread(runtime.current) is rt  # a request's thread, say
    component, made = count_makes()
    value = component.get()
    assert await asyncio.to_thread(component.get) is value
    assert component.get(rt) is value and made == [rt]  # made once, on first use
    assert rt in runtime.every()


def test_each_loop_has_its_own_runtime_and_components() -> None:
    component, made = count_makes()
    seen: dict[str, tuple[runtime.Runtime, object]] = {}

    def on_a_loop_of_its_own(name: str) -> None:
        async def main() -> None:
            seen[name] = (runtime.current(), component.get())

        asyncio.run(main())

    threads = [threading.Thread(target=on_a_loop_of_its_own, args=(n,)) for n in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    (rt_a, value_a), (rt_b, value_b) = seen["a"], seen["b"]
    assert rt_a is not rt_b and rt_a.loop is not rt_b.loop
    # The two threads run at once: either may make its component first.
    assert value_a is not value_b and made in ([rt_a, rt_b], [rt_b, rt_a])
    # Their loops are closed: they are not counted among the process's runtimes.
    assert rt_a not in runtime.every() and rt_b not in runtime.every()


async def test_closing_a_runtime_cancels_its_tasks_and_the_loop_gets_a_new_one() -> None:
    rt = runtime.current()
    component, _ = count_makes()
    before = component.get()
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task = rt.spawn(forever())
    await started.wait()
    assert rt.tasks() == [task]
    rt.stopping = True
    await close(rt)
    assert task.cancelled()
    fresh = runtime.current()
    assert fresh is not rt and not fresh.stopping
    assert component.get() is not before  # components start again from nothing


def test_a_closed_runtime_takes_its_limit_state_with_it(settings: Any) -> None:
    """What every test relies on (tests/runtime_control.py): the slots a test held are
    gone once the runtime is discarded, so the next test starts from none."""
    from project import limits
    from project.errors import TooManyConnections

    settings.REDIS_URL = ""
    settings.TANDEM_MAX_CONNECTIONS_PER_USER = 1
    limits.take_stream_slot(4242, "con_one")
    with pytest.raises(TooManyConnections):
        limits.take_stream_slot(4242, "con_two")
    runtime.current().close()
    limits.take_stream_slot(4242, "con_two")
    limits.release_stream_slot("con_two")

"""The SDK runs a request's handler up to its first wait before making a Task
(stellagw.service.sdk._start_eagerly): what `await` and a Task guarantee must still hold."""
from __future__ import annotations

import asyncio
import contextvars

import pytest

from stellagw.service.sdk import _start_eagerly

VAR = contextvars.ContextVar("VAR", default="unset")


def run(coro_fn):
    return asyncio.run(coro_fn())


def test_a_handler_that_never_waits_finishes_without_a_task():
    done = []

    async def handler():
        done.append(asyncio.current_task())
        return 1

    async def main():
        assert _start_eagerly(asyncio.get_running_loop(), handler()) is None
        assert done == [asyncio.current_task()]   # ran inline, in the caller's turn
    run(main)


def test_a_handler_that_waits_continues_in_a_task_with_its_result():
    async def handler(fut):
        first = await fut
        await asyncio.sleep(0)
        second = await asyncio.sleep(0.01, result="b")
        return first + second

    async def main():
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        task = _start_eagerly(loop, handler(fut))
        assert isinstance(task, asyncio.Task) and not task.done()
        fut.set_result("a")
        assert await task == "ab"
    run(main)


def test_cancelling_the_task_cancels_the_handler_where_it_waits():
    seen = []

    async def handler():
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise
        finally:
            seen.append("finally")

    async def main():
        task = _start_eagerly(asyncio.get_running_loop(), handler())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen == ["cancelled", "finally"]
    run(main)


def test_an_error_after_the_first_wait_reaches_the_task():
    async def handler():
        await asyncio.sleep(0)
        raise ValueError("boom")

    async def main():
        task = _start_eagerly(asyncio.get_running_loop(), handler())
        with pytest.raises(ValueError, match="boom"):
            await task
    run(main)


def test_context_changes_stay_with_the_request():
    async def handler(fut):
        VAR.set("request")
        await fut
        return VAR.get()

    async def main():
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        task = _start_eagerly(loop, handler(fut))
        assert VAR.get() == "unset"          # the first step ran in a copy of the context
        fut.set_result(None)
        assert await task == "request"       # and the Task carried that copy on
        assert VAR.get() == "unset"
    run(main)

"""LoopThread: synchronous code running coroutines on a background event loop."""

import asyncio
import threading

import pytest

from comms.aio import LoopThread


async def add(a, b):
    await asyncio.sleep(0)
    return a + b, threading.current_thread().name


@pytest.fixture
def loop_thread():
    with LoopThread(name="test-loop") as lt:
        yield lt


def test_run_returns_the_result_from_the_loop_thread(loop_thread):
    total, thread_name = loop_thread.run(add(2, 3), timeout=5)
    assert total == 5
    assert thread_name == "test-loop"
    assert thread_name != threading.current_thread().name


def test_submit_returns_a_future(loop_thread):
    futures = [loop_thread.submit(add(i, i)) for i in range(10)]
    assert [f.result(timeout=5)[0] for f in futures] == [2 * i for i in range(10)]


def test_exceptions_propagate(loop_thread):
    async def fail():
        raise KeyError("missing-model")

    with pytest.raises(KeyError, match="missing-model"):
        loop_thread.run(fail(), timeout=5)
    with pytest.raises(KeyError):
        loop_thread.submit(fail()).result(timeout=5)


def test_timeout_raises_and_cancels_the_coroutine(loop_thread):
    cancelled = threading.Event()

    async def hang():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(TimeoutError, match=r"within 0\.1 s"):
        loop_thread.run(hang(), timeout=0.1)
    assert cancelled.wait(5)


def test_a_timeout_raised_by_the_coroutine_is_not_mistaken_for_ours(loop_thread):
    async def own_timeout():
        raise TimeoutError("server did not answer")

    with pytest.raises(TimeoutError, match="server did not answer"):
        loop_thread.run(own_timeout(), timeout=5)


def test_state_persists_across_calls_on_one_loop(loop_thread):
    async def make_queue():
        return asyncio.Queue()

    queue = loop_thread.run(make_queue(), timeout=5)
    loop_thread.run(queue.put(7), timeout=5)
    assert loop_thread.run(queue.get(), timeout=5) == 7


def test_run_from_the_loop_thread_is_refused(loop_thread):
    async def nested():
        loop_thread.run(add(1, 1), timeout=1)

    with pytest.raises(RuntimeError, match="from the loop thread"):
        loop_thread.run(nested(), timeout=5)


def test_stop_cancels_pending_tasks_and_ends_the_thread():
    cancelled = threading.Event()

    async def background():
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    lt = LoopThread().start()
    lt.submit(background())
    lt.run(asyncio.sleep(0.01), timeout=5)  # let the background task start
    lt.stop()
    assert cancelled.is_set()
    assert not lt.running
    with pytest.raises(RuntimeError, match="not running"):
        lt.submit(add(1, 2))


def test_restart_after_stop():
    lt = LoopThread()
    with lt:
        assert lt.run(add(1, 1), timeout=5)[0] == 2
    with lt:
        assert lt.run(add(2, 2), timeout=5)[0] == 4
    assert not lt.running

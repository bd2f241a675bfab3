"""The serving clock: what the frame loop's 80 ms ticks, the client's pacing and the sessions' idle
timers wait on. `Clock` is real time (the event loop's); `ManualClock` is virtual time that moves
only when told, so tests check pacing and timeouts without depending on the machine's speed."""

from __future__ import annotations

import asyncio
import heapq
import itertools


class Clock:
  """Real time: the running event loop's monotonic clock."""

  def time(self) -> float:
    return asyncio.get_running_loop().time()

  async def sleep_until(self, deadline: float) -> None:
    await asyncio.sleep(max(0.0, deadline - self.time()))

  async def wait_for(self, awaitable, timeout: float):
    """The awaitable's result, or asyncio.TimeoutError once `timeout` seconds passed."""
    return await asyncio.wait_for(awaitable, timeout)


class ManualClock(Clock):
  """Virtual time for tests: `advance` moves it, waking every sleeper and timeout whose deadline
  it passes, in deadline order."""

  def __init__(self, start: float = 0.0):
    self.now = start
    self._timers: list = []  # heap of (deadline, sequence, future)
    self._sequence = itertools.count()

  def time(self) -> float:
    return self.now

  def _timer(self, deadline: float) -> asyncio.Future:
    future = asyncio.get_running_loop().create_future()
    heapq.heappush(self._timers, (deadline, next(self._sequence), future))
    return future

  async def sleep_until(self, deadline: float) -> None:
    if deadline <= self.now:
      await asyncio.sleep(0)
      return
    await self._timer(deadline)

  async def wait_for(self, awaitable, timeout: float):
    task = asyncio.ensure_future(awaitable)
    timer = self._timer(self.now + timeout)
    try:
      await asyncio.wait({task, timer}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
      task.cancel()
      raise
    finally:
      timer.cancel()
    if task.done():
      return task.result()
    task.cancel()
    raise asyncio.TimeoutError

  def next_deadline(self) -> float | None:
    """The earliest pending deadline, or None."""
    while self._timers and self._timers[0][2].done():  # cancelled timeouts
      heapq.heappop(self._timers)
    return self._timers[0][0] if self._timers else None

  async def advance(self, seconds: float) -> None:
    """Moves time forward by `seconds`, waking each timer in deadline order and letting the
    woken tasks run before the next one fires."""
    end = self.now + seconds
    while True:
      for _ in range(5):  # ready tasks run (and set their timers) before time moves
        await asyncio.sleep(0)
      deadline = self.next_deadline()
      if deadline is None or deadline > end:
        break
      self.now = max(self.now, deadline)
      heapq.heappop(self._timers)[2].set_result(None)
    self.now = end

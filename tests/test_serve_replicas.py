"""Three `flmjax serve` replicas behind HAProxy on loopback, one drained by SIGTERM mid-
conversation: its sessions finish whole, new sessions go to the other two, no session is lost,
and every session's replies equal the offline replay of its own input (0 cross-talk). The
HAProxy configuration is the one docs/serving.md shows, with free ports substituted. Frames are
counted; nothing is asserted about wall-clock time (the bounded waits only end a failing run).
"""

import asyncio
import csv
import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys

import aiohttp
import pytest
from serve_harness import check_crosstalk, converse, voice

pytestmark = pytest.mark.slow  # subprocess replicas and HAProxy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, 'tests', 'golden')
# The golden tiny model's replies peak near the client's 1.5 bound on decoded audio (issue 25
# section 1; up to 1.47 before Opus for these inputs). 80 and 40 frames passed 5 runs; with 100
# one client stopped at reply 91 of 99 (close 1006), most likely on that bound.
SLOTS, FIRST, FIRST_FRAMES, SECOND, SECOND_FRAMES = 4, 6, 80, 6, 40
DOC_PORTS = {'8080': 'front', '8990': 0, '8991': 1, '8992': 2, '9990': 3, '9991': 4, '9992': 5}
# A replica's line per session: its slot, and its first underrun (-1: none).
SESSION_LINE = re.compile(r'session (\w+) slot (\d+) .*underruns \d+ \(first at frame (-?\d+)\)')


def haproxy_path() -> str:
  path = shutil.which('haproxy') or shutil.which('haproxy', path='/usr/sbin:/sbin')
  if path is None:
    pytest.fail('haproxy not found: `apt-get install -y haproxy` (.ci/run does)')
  return path


def free_ports(n: int) -> list[int]:
  socks = [socket.socket() for _ in range(n)]
  for s in socks:
    s.bind(('127.0.0.1', 0))
  ports = [s.getsockname()[1] for s in socks]
  for s in socks:
    s.close()
  return ports


def haproxy_config(ports: dict, sock_path: str) -> str:
  """The ```haproxy block of docs/serving.md with the test's ports, socket and maxconn."""
  text = open(os.path.join(ROOT, 'docs', 'serving.md')).read()
  config = re.search(r'```haproxy\n(.*?)```', text, re.S).group(1)
  for doc_port, key in DOC_PORTS.items():
    config = config.replace(f'127.0.0.1:{doc_port}', f'127.0.0.1:{ports[key]}')
    config = config.replace(f'agent-port {doc_port}', f'agent-port {ports[key]}')
  config = config.replace('/run/haproxy/flmjax.sock', sock_path)
  return config.replace('maxconn 16', f'maxconn {SLOTS}')


def start_replica(port: int, agent_port: int, log_path: str, cache: str) -> subprocess.Popen:
  cmd = [sys.executable, '-m', 'flmjax', 'serve', '--checkpoint', os.path.join(GOLDEN, 'flm_tiny')]
  cmd += ['--mimi', os.path.join(GOLDEN, 'mimi_small'), '--slots', str(SLOTS), '--max-len', '256']
  cmd += ['--greedy', '--port', str(port), '--agent-port', str(agent_port)]
  # The replicas run with this process's XLA flags (the serve_pipeline fixture's numerics, for
  # the replay) and share a compilation cache: the first compiles, the others load.
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_COMPILATION_CACHE_DIR': cache}
  out = open(log_path, 'w')
  return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


async def get_json(http, url: str) -> tuple[int, dict]:
  async with http.get(url) as r:
    return r.status, await r.json()


async def until(predicate, what: str, timeout_s: float = 180.0):
  """Polls the async predicate until it returns something true (bounded: a failing run ends)."""
  for _ in range(int(timeout_s / 0.05)):
    value = await predicate()
    if value:
      return value
    await asyncio.sleep(0.05)
  raise AssertionError(f'never happened: {what}')


def haproxy_servers(sock_path: str) -> dict:
  """{server name: row of HAProxy's `show stat`} for the backend."""
  with socket.socket(socket.AF_UNIX) as s:
    s.connect(sock_path)
    s.sendall(b'show stat\n')
    data = b''
    while chunk := s.recv(65536):
      data += chunk
  rows = csv.DictReader(io.StringIO(data.decode().lstrip('# ')))
  return {r['svname']: r for r in rows if r['pxname'] == 'replicas'}


def test_replica_drained_mid_conversation_loses_no_session(request, tiny_model, tmp_path):
  haproxy = haproxy_path()
  numbers = free_ports(7)
  ports = {i: numbers[i] for i in range(6)} | {'front': numbers[6]}
  logs = [str(tmp_path / f'replica{i}.log') for i in range(3)]
  cache = str(tmp_path / 'jax_cache')
  sock_path = str(tmp_path / 'haproxy.sock')
  procs, balancer = [], None
  try:
    procs.append(start_replica(ports[0], ports[3], logs[0], cache))
    # The replay's pipeline (compiled here while replica 0 compiles, unless an earlier test did).
    serve_pipeline = request.getfixturevalue('serve_pipeline')

    async def scenario():
      async with aiohttp.ClientSession() as http:

        async def healthy(i):
          if procs[i].poll() is not None:
            raise AssertionError(f'replica {i} exited: {open(logs[i]).read()[-2000:]}')
          try:
            return (await get_json(http, f'http://127.0.0.1:{ports[i]}/healthz'))[0] == 200
          except aiohttp.ClientError:
            return False

        await until(lambda: healthy(0), 'replica 0 up')
        procs.extend(start_replica(ports[i], ports[3 + i], logs[i], cache) for i in (1, 2))
        await until(lambda: healthy(1), 'replica 1 up')
        await until(lambda: healthy(2), 'replica 2 up')
        return await conversations(http)

    async def conversations(http):
      nonlocal balancer
      config = tmp_path / 'haproxy.cfg'
      config.write_text(haproxy_config(ports, sock_path))
      out = open(tmp_path / 'haproxy.log', 'w')
      balancer = subprocess.Popen([haproxy, '-db', '-f', str(config)], stdout=out, stderr=out)

      async def all_up():
        if balancer.poll() is not None:
          raise AssertionError(f'haproxy exited: {(tmp_path / "haproxy.log").read_text()}')
        try:
          rows = haproxy_servers(sock_path).values()
        except OSError:
          return False
        rows = [r for r in rows if r['svname'] != 'BACKEND']
        return len(rows) == 3 and all(r['status'] == 'UP' and r['weight'] == '100' for r in rows)

      await until(all_up, 'HAProxy sees 3 replicas UP, agents at 100%')
      url = f'ws://127.0.0.1:{ports["front"]}/api/chat'
      first = []
      for i in range(FIRST):  # one at a time, so leastconn spreads them 2, 2, 2
        admitted = asyncio.Event()

        async def hook(sid, admitted=admitted):
          admitted.set()

        pcm = voice(100 + i, FIRST_FRAMES)
        first.append(asyncio.create_task(converse(url, pcm, pace=False, session_hook=hook)))
        await asyncio.wait_for(admitted.wait(), 120)
      health = [(await get_json(http, f'http://127.0.0.1:{ports[i]}/healthz'))[1] for i in range(3)]
      live = [h['live_sessions'] for h in health]
      assert sum(live) == FIRST
      drained = live.index(max(live))
      others = [i for i in range(3) if i != drained]

      async def agents_report():  # HAProxy read the agents: weight 100% * free/places
        rows = haproxy_servers(sock_path)
        return all(
          rows[f'r{i + 1}']['weight'] == str(100 * (SLOTS - live[i]) // SLOTS) for i in range(3)
        )

      await until(agents_report, 'HAProxy weights follow the agents')

      async def mid_conversation():  # the drained replica's sessions have replies under way
        h = (await get_json(http, f'http://127.0.0.1:{ports[drained]}/healthz'))[1]
        return h['ticks'] >= 10

      await until(mid_conversation, 'sessions under way')
      sigterm_at = asyncio.get_running_loop().time()  # the clients' receive_times' clock
      procs[drained].send_signal(signal.SIGTERM)

      async def draining():
        return (await get_json(http, f'http://127.0.0.1:{ports[drained]}/healthz'))[0] == 503

      await until(draining, 'healthz 503 on the drained replica')

      async def out_of_rotation():
        return not haproxy_servers(sock_path)[f'r{drained + 1}']['status'].startswith('UP')

      # Until its next check (500 ms) HAProxy may still pick the draining replica: the 503 is
      # then retried elsewhere, unless the others are full (as here), when the client gets it
      # (docs/serving.md). The new sessions come once HAProxy took the replica out.
      await until(out_of_rotation, 'HAProxy takes the drained replica out')
      pcms = [voice(200 + i, SECOND_FRAMES) for i in range(SECOND)]
      second = [asyncio.create_task(converse(url, pcm, pace=False)) for pcm in pcms]
      convs = await asyncio.gather(*first, *second)
      stats = haproxy_servers(sock_path)
      return convs, sigterm_at, drained, others, live, stats

    convs, sigterm_at, drained, others, live, stats = asyncio.run(scenario())
    exit_code = procs[drained].wait(120)
  finally:
    for p in procs + ([balancer] if balancer else []):
      if p.poll() is None:
        p.terminate()
    for p in procs + ([balancer] if balancer else []):
      try:
        p.wait(120)
      except subprocess.TimeoutExpired:
        p.kill()
  for p in procs:
    if p is not procs[drained]:
      assert p.returncode == 0  # SIGTERM with nothing live: drained at once, exit 0

  # Which replica, and which slot, served each session: the replicas' session lines.
  where = {}
  for i, path in enumerate(logs):
    for m in SESSION_LINE.finditer(open(path).read()):
      where[m.group(1)] = (i, int(m.group(2)), int(m.group(3)))
  first, second = convs[:FIRST], convs[FIRST:]
  assert all(c.session in where for c in convs)
  on_drained = [c for c in first if where[c.session][0] == drained]
  assert len(on_drained) == live[drained] >= 2
  assert all(where[c.session][0] in others for c in second)  # new sessions: the other two only
  # No session lost: every frame sent, one reply per frame (less the first silent step).
  for c, frames in zip(convs, [FIRST_FRAMES] * FIRST + [SECOND_FRAMES] * SECOND):
    assert (c.frames_sent, c.frames_received, c.close_code) == (frames, frames - 1, 1000)
  # The drained replica's sessions were mid-conversation at the SIGTERM and finished whole.
  for c in on_drained:
    assert sum(t > sigterm_at for t in c.receive_times) > 0  # replies went on after SIGTERM
  assert exit_code == 0
  drained_log = open(logs[drained]).read()
  assert (
    f'drained: {len(on_drained)} live sessions finished, 0 closed at the deadline' in drained_log
  )
  print(
    'HAProxy (sessions, retries, redispatches, most queued):',
    {n: (r['stot'], r['wretr'], r['wredis'], r['qmax']) for n, r in stats.items()},
  )
  # 0 cross-talk: each session's text and audio equal the offline replay of its own input.
  # Sessions that shared a slot on different replicas (or one after another) replay apart.
  # A session whose audio came late at the replica (an underrun: silence fed, which the replay
  # does not know of; the clients send unpaced, so only a starved test process causes one) is
  # compared up to its first underrun.
  groups, compared = [], 0
  for c in convs:
    _, slot, underrun = where[c.session]
    group = next((g for g in groups if slot not in g[0]), None)
    if group is None:
      groups.append(group := ({}, {}))
    group[0][slot] = c
    if underrun >= 0:
      group[1][slot] = max(underrun - 1, 0)
    compared += group[1].get(slot, c.frames_received)
  for convs_by_slot, frames in groups:
    found = check_crosstalk(serve_pipeline, tiny_model.cfg, convs_by_slot, frames)
    assert found == {slot: [] for slot in convs_by_slot}
  print(f'cross-talk: {compared} reply frames compared, all equal')

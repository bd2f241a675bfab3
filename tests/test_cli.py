"""The `flmjax` command line: dispatch, help, and errors that name the problem."""

from flmjax import cli


def test_top_level_help_and_unknown_command(capsys):
  assert cli.main(['--help']) == 0
  out = capsys.readouterr().out
  assert all(name in out for name in ('main', 'data', 'train', 'export', 'chat'))
  assert cli.main(['bogus']) == 1
  assert "unknown command 'bogus'" in capsys.readouterr().err


def test_train_help_and_flag_errors(capsys, tmp_path):
  assert cli.main(['train', '--help']) == 0
  assert '--config' in capsys.readouterr().out
  assert cli.main(['train', '--bogus']) == 1
  assert 'unrecognized arguments: --bogus' in capsys.readouterr().err
  assert cli.main(['train']) == 1
  assert '--config is required' in capsys.readouterr().err
  assert cli.main(['train', '--config', str(tmp_path / 'nope.py')]) == 1
  assert 'nope.py not found' in capsys.readouterr().err


def test_old_flag_spellings_still_work(capsys, tmp_path):
  """Every flag is spelled with dashes; the earlier underscore spellings (absl's, for train) parse
  into the same option, so existing scripts keep working. Each call stops at a check that runs
  after parsing: only a parsed flag reaches it."""
  nope = str(tmp_path / 'nope.py')
  for argv in (
    [
      'train',
      '--config',
      nope,
      '--run_dir',
      str(tmp_path),
      '--noprogress',
      '--init_from',
      str(tmp_path),
      '--coordinator_address',
      'h:1',
      '--num_processes',
      '2',
      '--process_id',
      '0',
    ],
    ['train', '--config', nope, '--run-dir', str(tmp_path), '--no-progress', '--progress'],
    ['main', '--config', nope, '--run_dir', str(tmp_path)],
  ):
    assert cli.main(argv) == 1
    assert 'nope.py not found' in capsys.readouterr().err, argv
  for flag in ('--stop_after', '--stop-after'):  # the same option: its own check names it
    assert cli.main(['train', '--config', nope, flag, '0']) == 1
    assert '--stop-after 0 must be >= 1' in capsys.readouterr().err
  for flag in ('--grad_accum', '--grad-accum'):
    assert cli.main(['aot', '--topology', 'v5e:2x2', flag, 'x']) == 1
    assert "invalid int value: 'x'" in capsys.readouterr().err
  assert cli.main(['train', '--help']) == 0
  out = capsys.readouterr().out
  options = out.split('options:')[1].split('Several processes')[0]
  assert '--run-dir' in options and '--run_dir' not in options  # the old spellings stay hidden

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
  assert "Unknown command line flag 'bogus'" in capsys.readouterr().err
  assert cli.main(['train']) == 1
  assert '--config is required' in capsys.readouterr().err
  assert cli.main(['train', '--config', str(tmp_path / 'nope.py')]) == 1
  assert 'nope.py not found' in capsys.readouterr().err

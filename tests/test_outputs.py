"""flmjax.outputs (where a command writes, checked first) and how a command spells the library's
argument names as its flags (flmjax.cli.spell)."""

import pytest

from flmjax.cli import spell
from flmjax.outputs import check_out_dir, check_out_file


def test_spell_maps_argument_names_to_flags():
  flags = {'out': '--out', 'overwrite': '--overwrite', 'in_dir': '--in'}
  message = '`out` /x already holds [a]; pass `overwrite` (`in_dir` /y); `sox a b` and `other`'
  assert spell(message, flags) == (
    '--out /x already holds [a]; pass --overwrite (--in /y); `sox a b` and `other`'
  )  # a command example and an argument without a flag keep their backticks


def test_check_out_dir_names_the_argument_and_keeps_what_is_not_ours(tmp_path):
  (tmp_path / 'afile').write_text('keep')
  with pytest.raises(FileExistsError, match=r'^`out` .*afile is a file; give a directory path$'):
    check_out_dir(str(tmp_path / 'afile'), True)
  check_out_dir(str(tmp_path / 'new'), False)  # not there yet: fine
  run = tmp_path / 'run'
  run.mkdir()
  check_out_dir(str(run), False)  # empty: fine
  (run / 'transcript.txt').write_text('earlier')
  outputs = ('transcript.txt', 'model_codes.npy')
  with pytest.raises(
    FileExistsError, match=r"already holds \['transcript.txt'\]; pass `overwrite`"
  ):
    check_out_dir(str(run), False, outputs)
  check_out_dir(str(run), True, outputs)
  check_out_dir(str(run), False, ('model_codes.npy',))  # only the command's own names count
  with pytest.raises(FileExistsError, match='already exists and is not empty; pass `overwrite`'):
    check_out_dir(str(run), False)
  # a marker: someone else's non-empty folder is refused even with overwrite
  with pytest.raises(FileExistsError, match=r'is not a dataset \(no summary.json\); choose a new'):
    check_out_dir(str(run), True, marker='summary.json', ours='a dataset')
  (run / 'summary.json').write_text('{}')
  with pytest.raises(FileExistsError, match='already holds a dataset; pass `overwrite` to replace'):
    check_out_dir(str(run), False, marker='summary.json', ours='a dataset')
  check_out_dir(str(run), True, marker='summary.json', ours='a dataset')
  assert (run / 'transcript.txt').read_text() == 'earlier'  # a check writes nothing


def test_check_out_file(tmp_path):
  check_out_file(str(tmp_path / 'reply.wav'))
  with pytest.raises(IsADirectoryError, match='is a directory; give a .wav file path'):
    check_out_file(str(tmp_path), '.wav file')
  with pytest.raises(FileNotFoundError, match='does not exist; create it first'):
    check_out_file(str(tmp_path / 'nope' / 'reply.wav'))

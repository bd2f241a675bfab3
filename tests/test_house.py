"""The house rules that a test can check: CLI modules are leaves, and the kernels install as
`flmjax.kernels` only (the top-level name `kernels` is someone else's on PyPI)."""

import ast
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from flmjax.cli import COMMANDS

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI_MODULES = {module for module, _, _ in COMMANDS.values()}


def _imported(path: pathlib.Path) -> set[str]:
  """Every module `path` imports, as dotted names (`from a import b` gives a and a.b)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names.add(node.module)
      names.update(f'{node.module}.{a.name}' for a in node.names)
  return names


def test_no_module_imports_a_cli_module():
  """Only the dispatcher (flmjax/cli.py) loads a command's module; library code, experiments
  and tests use library functions (or run a command through the dispatcher)."""
  assert 'flmjax.main' in CLI_MODULES and 'flmjax.decode.cli' in CLI_MODULES
  found = []
  for folder in ('flmjax', 'kernels', 'experiments', 'tests'):
    for path in sorted((ROOT / folder).rglob('*.py')):
      if path == ROOT / 'flmjax' / 'cli.py':
        continue
      found += [f'{path.relative_to(ROOT)} imports {m}' for m in _imported(path) & CLI_MODULES]
  assert not found, found


def test_every_flmjax_import_resolves():
  """Imports inside functions (experiments, lazy imports) run only when called: each `flmjax`
  name imported anywhere must still exist, so a moved module cannot strand a script."""
  import importlib

  found = []
  for folder in ('flmjax', 'kernels', 'experiments', 'tests'):
    for path in sorted((ROOT / folder).rglob('*.py')):
      for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
          pairs = [(a.name, None) for a in node.names if a.name.split('.')[0] == 'flmjax']
        elif (
          isinstance(node, ast.ImportFrom)
          and not node.level
          and node.module
          and (node.module.split('.')[0] == 'flmjax')
        ):
          pairs = [(node.module, a.name) for a in node.names]
        else:
          continue
        for module, name in pairs:
          try:
            mod = importlib.import_module(module)
            if name is not None and not hasattr(mod, name):
              importlib.import_module(f'{module}.{name}')  # a submodule
          except ImportError as e:
            found.append(f'{path.relative_to(ROOT)}:{node.lineno}: {e}')
  assert not found, found


# The layers of docs/architecture.md §11, bottom first: a room imports only from earlier layers.
LAYERS = (
  ('errors',),
  ('config', 'platforms', 'outputs'),
  ('sharding', 'distributed'),
  ('model',),
  ('kernels',),
  ('checkpoint',),
  ('codec',),
  ('data',),
  ('train',),
  ('decode',),
  ('eval', 'serve', 'aot', 'configs'),
)


def test_rooms_import_only_earlier_layers():
  layer = {room: i for i, rooms in enumerate(LAYERS) for room in rooms}
  found = []
  for path in sorted((ROOT / 'flmjax').rglob('*.py')) + sorted((ROOT / 'kernels').rglob('*.py')):
    rel = path.relative_to(ROOT)
    if path.name in ('cli.py', 'main.py', '__main__.py') or rel == pathlib.Path(
      'flmjax', '__init__.py'
    ):
      continue  # the command line and the package's public names sit on top of every room
    room = 'kernels' if rel.parts[0] == 'kernels' else rel.parts[1].removesuffix('.py')
    for module in _imported(path):
      parts = module.split('.')
      if parts[0] == 'flmjax' and len(parts) > 1 and parts[1] in layer and parts[1] != room:
        if layer[parts[1]] >= layer[room]:
          found.append(f'{rel} ({room}) imports {module}')
  assert not found, found


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix('').parts)
  if parts[0] == 'kernels':
    parts.insert(0, 'flmjax')
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _import_graph() -> dict[str, set[str]]:
  """module -> the flmjax modules it imports, at module level or inside a function (a lazy
  import runs too). `from a import b` is an edge to a.b when that is a module, else to a; a
  module's own parent packages are loaded before it, so they are no edge."""
  paths = sorted((ROOT / 'flmjax').rglob('*.py')) + sorted((ROOT / 'kernels').rglob('*.py'))
  modules = {_module_name(p): p for p in paths}
  graph = {}
  for name, path in modules.items():
    edges = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
        subs = [f'{node.module}.{a.name}' for a in node.names]
        targets = [t for t in subs if t in modules] + [node.module] * any(
          t not in modules for t in subs
        )
      else:
        continue
      for target in targets:
        parts = target.split('.')
        edges.update('.'.join(parts[: i + 1]) for i in range(len(parts)))  # parents load first
    graph[name] = {e for e in edges if e in modules and e != name and not name.startswith(e + '.')}
  return graph


def test_no_import_cycle():
  """No module reaches itself through imports, inside a package or across packages (Tarjan's
  strongly connected components over the graph)."""
  graph, index, low, stack, cycles = _import_graph(), {}, {}, [], []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = stack[stack.index(v) :]
      del stack[stack.index(v) :]
      if len(component) > 1:
        cycles.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  assert not cycles, cycles


def test_decode_serve_eval_never_reach_train():
  """Serving and evaluation rest on flmjax.checkpoint and flmjax.model: no module under
  decode/, serve/ or eval/ imports flmjax.train, directly or through another module."""
  graph, found = _import_graph(), []
  for start in sorted(graph):
    if start.split('.')[1:2] not in (['decode'], ['serve'], ['eval']):
      continue
    seen, todo = set(), [start]
    while todo:
      for w in graph[todo.pop()] - seen:
        seen.add(w)
        todo.append(w)
    found += [f'{start} reaches {m}' for m in sorted(seen) if m.startswith('flmjax.train')][:1]
  assert not found, found


@pytest.mark.parametrize('name', ['tiny_dual', 'small_dual'])
def test_loading_a_config_builds_nothing(tmp_path, name):
  """get_config only names the corpus; `train` builds it (so `flmjax aot --config` does not)."""
  from flmjax.train.config import load_config_file

  tc = load_config_file(str(ROOT / 'experiments' / 'configs' / f'{name}.py'), str(tmp_path / 'run'))
  assert not (tmp_path / 'run').exists()
  assert tc.corpus.split('duplex') == str(tmp_path / 'run' / 'corpus' / 'prepared' / 'duplex')
  assert tc.stages[-1].sources[0].path == tc.corpus.split('duplex')
  assert tc.tokenizer == str(tmp_path / 'run' / 'corpus' / 'raw' / 'tokenizer.model')


def test_a_preset_loads_by_name(tmp_path):
  """`--config tiny_dual` names the default that ships in the package; it is the same config as
  experiments/configs/tiny_dual.py, and an unknown name lists the presets."""
  from flmjax.train.config import TrainConfigError, load_config_file, presets

  assert 'tiny_dual' in presets()
  by_name = load_config_file('tiny_dual', str(tmp_path / 'run'))
  by_path = load_config_file(
    str(ROOT / 'experiments' / 'configs' / 'tiny_dual.py'), str(tmp_path / 'run')
  )
  assert by_name == by_path
  with pytest.raises(TrainConfigError, match="no preset of that name; presets: .*'tiny_dual'"):
    load_config_file('tiny_duel')


def test_kernels_import_as_flmjax_kernels_only(tmp_path):
  """Outside the repository (a temporary working directory), the installed package provides
  flmjax.kernels and no top-level `kernels`."""
  code = (
    'import importlib.util, flmjax.kernels.depth_step as d; '
    'print(importlib.util.find_spec("kernels")); print(d.select_depth_layers_fn.__name__)'
  )
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ['None', 'select_depth_layers_fn'], out.stdout


@pytest.mark.slow
def test_wheel_installs_kernels_inside_flmjax(tmp_path):
  """A regular (non-editable) wheel holds kernels/ as flmjax/kernels/ and nothing top-level
  besides flmjax; installed from it alone, flmjax.kernels imports."""
  src = tmp_path / 'src'  # a copy: building writes build/ beside the sources
  for name in ('flmjax', 'kernels'):
    shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns('__pycache__'))
  for name in ('setup.py', 'setup.cfg', 'pyproject.toml', 'README.md'):
    shutil.copy(ROOT / name, src / name)
  build = subprocess.run(
    [
      sys.executable,
      '-m',
      'pip',
      'wheel',
      '-q',
      '--no-deps',
      '--no-build-isolation',
      '-w',
      str(tmp_path / 'dist'),
      str(src),
    ],
    capture_output=True,
    text=True,
    timeout=600,
    cwd=tmp_path,
  )
  assert build.returncode == 0, build.stderr
  (wheel,) = (tmp_path / 'dist').glob('flmjax-*.whl')
  names = zipfile.ZipFile(wheel).namelist()
  tops = {n.split('/')[0] for n in names if not n.split('/')[0].endswith('.dist-info')}
  assert tops == {'flmjax'}, tops
  assert {
    'flmjax/kernels/__init__.py',
    'flmjax/kernels/depth_step.py',
    'flmjax/kernels/reference.py',
  } <= set(names)
  zipfile.ZipFile(wheel).extractall(tmp_path / 'site')
  env = {**os.environ, 'PYTHONPATH': str(tmp_path / 'site')}
  code = (
    'import flmjax, flmjax.kernels.depth_step, importlib.util; '
    'print(flmjax.__file__); print(importlib.util.find_spec("kernels"))'
  )
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == [str(tmp_path / 'site' / 'flmjax' / '__init__.py'), 'None']
  # The browser page is package data: a wheel serves it.
  code = 'from flmjax.serve import page; print(*sorted(page.load_files()))'
  out = subprocess.run(
    [sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr
  assert out.stdout.split() == ['app.js', 'capture.js', 'index.html']


def test_public_names_resolve():
  """flmjax.__all__ is the curated public API (docs/api.md lists it): each name loads."""
  import flmjax

  assert 'FlmjaxError' in flmjax.__all__
  missing = [name for name in flmjax.__all__ if getattr(flmjax, name, None) is None]
  assert not missing, missing
  assert set(flmjax.__all__) <= set((ROOT / 'docs' / 'api.md').read_text().split('`'))


def test_every_error_has_the_one_base():
  """Each exception class flmjax defines is a FlmjaxError and keeps a builtin base (ValueError,
  FileNotFoundError, ...), so callers may catch either."""
  import builtins
  import importlib
  import inspect

  from flmjax.errors import FlmjaxError

  found, checked = [], 0
  for name in sorted(_import_graph()):
    if name.endswith('__main__'):
      continue
    module = importlib.import_module(name)
    for cls in vars(module).values():
      if not (inspect.isclass(cls) and issubclass(cls, BaseException)) or cls is FlmjaxError:
        continue
      if cls.__module__ != name:
        continue
      checked += 1
      builtin = [b for b in cls.__mro__ if getattr(builtins, b.__name__, None) is b]
      if not issubclass(cls, FlmjaxError) or builtin[0] is Exception:
        found.append(f'{name}.{cls.__name__}')
  assert checked >= 17 and not found, found

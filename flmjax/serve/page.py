"""The browser page at `/`: static files shipped inside the package (flmjax/serve/static), read
once at start-up. Only those files are served: any other name, `..` in any spelling included,
is a 404, so nothing outside the package can be reached.
"""

from __future__ import annotations

import importlib.resources

from aiohttp import web

TYPES = {
  '.html': 'text/html',
  '.js': 'text/javascript',
  '.css': 'text/css',
  '.png': 'image/png',
  '.svg': 'image/svg+xml',
}
PREFIX = '/static/'  # the page's assets; `/` is static/index.html


def load_files() -> dict[str, tuple[bytes, str]]:
  """{file name: (bytes, content type)} of every file in flmjax/serve/static."""
  files = {}
  for entry in importlib.resources.files('flmjax.serve').joinpath('static').iterdir():
    suffix = '.' + entry.name.rsplit('.', 1)[-1]
    if entry.is_file() and suffix in TYPES:
      files[entry.name] = (entry.read_bytes(), TYPES[suffix])
  if 'index.html' not in files:
    raise FileNotFoundError('flmjax/serve/static/index.html is missing from the package')
  return files


def is_open(path: str) -> bool:
  """The page needs no token (it holds none); its websocket and settings calls do."""
  return path == '/' or path.startswith(PREFIX)


def add_routes(app: web.Application) -> None:
  files = load_files()

  def respond(name: str) -> web.Response:
    if name not in files:
      raise web.HTTPNotFound(text='not found')
    body, kind = files[name]
    return web.Response(
      body=body,
      content_type=kind,
      charset='utf-8' if kind.startswith('text') else None,
      headers={'Cache-Control': 'no-cache'},
    )

  async def index(request: web.Request) -> web.Response:
    return respond('index.html')

  async def static(request: web.Request) -> web.Response:
    return respond(request.match_info['name'])

  app.router.add_get('/', index)
  app.router.add_get(PREFIX + '{name}', static)

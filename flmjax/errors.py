"""The one base of flmjax's own errors. Each error class also keeps its builtin base (ValueError,
FileNotFoundError, ...), so `except FlmjaxError` catches every input problem flmjax names and
`except ValueError` still catches the ones it always did."""


class FlmjaxError(Exception):
  """A problem flmjax found and named in one line (the input, and how to fix it)."""

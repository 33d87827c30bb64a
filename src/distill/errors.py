"""The one exception type users see: the CLI prints its message on one line, no traceback."""


class DistillError(Exception):
    """A user-facing error. The message names the file, line and field where there is one."""


def where(path, line: int | None = None, field: str | None = None) -> str:
    """Format 'file:line: field' prefixes consistently for error messages."""
    out = str(path)
    if line is not None:
        out += f":{line}"
    if field is not None:
        out += f": field '{field}'"
    return out

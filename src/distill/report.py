"""``distill compare``: evaluated students side by side, refusing apples-to-oranges rows."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompareConfig:
    results: list[str] | None = field(default=None, metadata={"help": "results JSON files or directories to search", "positional": True})
    csv: str | None = field(default=None, metadata={"help": "also write the table as CSV"})
    html: str | None = field(default=None, metadata={"help": "also write a self-contained HTML page with a bar chart (+ PNG beside it)"})
    force: bool = field(default=False, metadata={"help": "show rows with differing generation settings or data, with a loud marker"})

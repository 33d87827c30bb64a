"""Print README's "Options" table from the code: one row per option group (and per command's own
options), the commands that take it, and the former names each option still answers to.

    .venv/bin/python scripts/options_table.py
"""

from __future__ import annotations

import importlib
from collections import defaultdict

from distill.cli import COMMANDS
from distill.config import leaves


def rows() -> list[tuple[str, list[str], list[str], list[str]]]:
    """(group title, its flags, the commands that take it, 'former -> new' names)."""
    flags: dict[str, dict[str, None]] = defaultdict(dict)
    commands: dict[str, list[str]] = defaultdict(list)
    former: dict[str, dict[str, None]] = defaultdict(dict)
    for command, (module, cls_name, _, _) in COMMANDS.items():
        cls = getattr(importlib.import_module(module), cls_name)
        for leaf in leaves(cls):
            title = leaf.section.__doc__.split(":")[0] if leaf.section else f"{command} (own options)"
            flags[title][leaf.flag] = None
            if command not in commands[title]:
                commands[title].append(command)
            for old in leaf.meta["aliases"]:
                former[title][f"`--{old.replace('_', '-')}` → `{leaf.flag}`"] = None
        for old, reshape in getattr(cls, "RESHAPED", {}).items():
            former[f"{command} (own options)"][f"`--{old.replace('_', '-')}` → {reshape.__doc__.strip()}"] = None
    return [(title, list(flags[title]), commands[title], list(former[title])) for title in flags]


def main() -> None:
    print("| options | flags | commands | former names (still work, with a note) |")
    print("| --- | --- | --- | --- |")
    for title, names, where, old in rows():
        print(f"| {title} | {' '.join(f'`{n}`' for n in names)} | {', '.join(where)} | {'; '.join(old) or '—'} |")


if __name__ == "__main__":
    main()

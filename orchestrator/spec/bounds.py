"""Limits a spec document must keep before anything builds it: bytes, nesting, entries, expanded aliases.

    text = read_bounded(path)            # InputError past MAX_BYTES (read that far only: /dev/zero included)
    check_bounds(text, source=path)      # InputError: too deep, a list too long, aliases that expand too far

YAML's aliases let a 1 KB file stand for a billion values (the "billion laughs"); nesting a few thousand
levels deep ends Python's recursive composer in a RecursionError. Both are counted here on libyaml's event
stream (flat: no recursion, aliases not expanded, each event seen once), so a refusal costs the time and
memory of reading the file once. A real spec is a few KiB with a few hundred values: the limits leave
generous room.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from orchestrator.errors import InputError

__all__ = ["MAX_BYTES", "MAX_DEPTH", "MAX_ENTRIES", "MAX_VALUES", "check_bounds", "read_bounded"]

MAX_BYTES = 1 << 20  # 1 MiB
MAX_DEPTH = 32  # nested mappings and lists
MAX_ENTRIES = 10_000  # items of one list, keys of one mapping
MAX_VALUES = 200_000  # scalars and collections in the whole document, every alias expanded

_Parser = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def read_bounded(path: str | Path, *, limit: int = MAX_BYTES) -> str:
    """A text file's contents, refused once it passes `limit` bytes (only limit + 1 bytes are ever read).

    Raises `InputError` with one line: no such file, not UTF-8, unreadable, or too large.
    """
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise InputError([((), "no such file")], source=source) from None
    except IsADirectoryError:
        raise InputError([((), "is a directory; expected a YAML file")], source=source) from None
    except OSError as e:
        raise InputError([((), f"cannot read: {e.strerror or e}")], source=source) from None
    if len(data) > limit:
        raise InputError([((), f"larger than {limit // 1024:,} KiB; a spec is a few KiB of YAML "
                               "(refused unread beyond that)")], source=source)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError([((), "not UTF-8 text; expected a YAML file")], source=source) from None


def check_bounds(text: str, *, source: str) -> None:
    """`InputError` (one line, with the line number) when the YAML document nests deeper than MAX_DEPTH, has a
    list or mapping of more than MAX_ENTRIES entries, or stands for more than MAX_VALUES values once its
    aliases are expanded. A syntax error is left to the loader, whose message says more."""
    stack: list[list] = []  # per open collection: [expanded size, entries, anchor, mapping?]
    sizes: dict[str, int] = {}  # anchor -> expanded size of its node

    def refuse(event, message: str):
        line = event.start_mark.line + 1
        raise InputError([(f"line {line}", message)], source=source)

    def add(event, size: int) -> None:
        if not stack:
            return
        top = stack[-1]
        top[0] += size
        top[1] += 1
        if top[0] > MAX_VALUES:
            refuse(event, f"its aliases expand to more than {MAX_VALUES:,} values (an alias bomb?); "
                          "a spec holds a few hundred")
        if top[1] > MAX_ENTRIES * (2 if top[3] else 1):
            what = "mapping has more than" if top[3] else "list has more than"
            refuse(event, f"a {what} {MAX_ENTRIES:,} entries; split the sweep into several specs")

    for parser in (_Parser, yaml.SafeLoader):  # libyaml stops at its own depth limit before saying where
        stack.clear()
        sizes.clear()
        try:
            for event in yaml.parse(text, Loader=parser):
                _count(event, stack, sizes, add, refuse)
            return
        except yaml.YAMLError:
            continue  # pure Python's parser is iterative too; if it fails as well, the loader reports it


def _count(event, stack: list[list], sizes: dict[str, int], add, refuse) -> None:
    if isinstance(event, yaml.ScalarEvent):
        if event.anchor:
            sizes[event.anchor] = 1
        add(event, 1)
    elif isinstance(event, yaml.AliasEvent):
        add(event, sizes.get(event.anchor, 1))
    elif isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
        if len(stack) >= MAX_DEPTH:
            refuse(event, f"nested more than {MAX_DEPTH} levels deep; a spec needs a few")
        stack.append([1, 0, event.anchor, isinstance(event, yaml.MappingStartEvent)])
    elif isinstance(event, (yaml.SequenceEndEvent, yaml.MappingEndEvent)):
        size, _, anchor, _ = stack.pop()
        if anchor:
            sizes[anchor] = size
        add(event, size)

"""The one YAML reader: every YAML file fedlocale reads (run config, policy, deployment file, a node's
augmentation and personalization settings, an audit keys file, a corpus archive's files) goes through here.

Rules, each a ``ConfigError`` naming ``file:line``:

* the file is UTF-8 (a byte-order mark is allowed); a byte that is not is named by its line and column;
* a key repeated in one mapping is refused, naming both lines: YAML would silently keep only the last, so a
  second ``train:`` block would replace the first;
* aliases (``*name``) are refused: a handful of nested aliases expands into billions of values (an "alias bomb")
  for every walk over the document, and a config gains nothing from them that writing the value out does not give;
* a file that cannot be read is named with the operating system's reason.

Besides the value, a reader gets the line of every dotted path (``regions[1].data``), so that problems found later
when the value is checked can be located too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from common.errors import ConfigError

Lines = dict[str, int]  # dotted path (``train.lr``, ``regions[0].name``) -> 1-based line


class _AliasRefused(yaml.YAMLError):
    def __init__(self, mark: yaml.Mark, anchor: str) -> None:
        super().__init__(f"alias *{anchor}")
        self.mark = mark
        self.anchor = anchor


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing aliases while composing (before anything is expanded)."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _AliasRefused(event.start_mark, str(event.anchor))
        return super().compose_node(parent, index)


def decode_utf8(data: bytes, source: str) -> str:
    """``data`` as text; ConfigError naming the line and column of the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        byte = data[err.start]
        raise ConfigError(
            [f"{source}:{line}: not UTF-8: byte 0x{byte:02X} at column {column} (save the file as UTF-8)"], source
        ) from err


def parse_yaml(text: str, source: str) -> tuple[Any, Lines]:
    """Parse one YAML document (``source`` names it in errors): its value (None when empty) and its lines."""
    loader = None
    try:
        loader = _Loader(text)  # checks every character of the text already
        node = loader.get_single_node()
        if node is None:
            return None, {}
        problems = _repeated_keys(node, source)
        if problems:
            raise ConfigError(problems, source)
        return loader.construct_document(node), line_map(node)
    except _AliasRefused as err:
        raise ConfigError(
            [
                f"{source}:{err.mark.line + 1}: alias *{err.anchor}: aliases are not supported "
                "(they can expand without bound); write the value out"
            ],
            source,
        ) from err
    except yaml.reader.ReaderError as err:
        # a character YAML does not allow (a control character): located by its position in the text
        line = text.count("\n", 0, err.position) + 1
        raise ConfigError(
            [f"{source}:{line}: not valid YAML: character {chr(err.character)!r} is not allowed"], source
        ) from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{source}:{mark.line + 1}" if mark is not None else source
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        raise ConfigError(
            [f"{where}: not valid YAML: {problem}" + (f" ({context})" if context else "")], source
        ) from err
    finally:
        if loader is not None:
            loader.dispose()


def read_yaml_file(path: Path) -> tuple[Any, Lines]:
    """Read and parse a YAML file by the rules above: its value (None when empty) and the line of every path."""
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ConfigError([f"{source}: cannot read: {err.strerror or err}"], source) from err
    return parse_yaml(decode_utf8(data, source), source)


def read_mapping(path: Path) -> tuple[dict[str, Any], Lines]:
    """A YAML file whose top level is a mapping (an empty file is an empty one), and its lines."""
    raw, lines = read_yaml_file(path)
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}:1: must be a mapping (key: value lines) at the top level"], str(path))
    return raw, lines


def _repeated_keys(root: yaml.Node, source: str) -> list[str]:
    """Every key that occurs twice in one mapping, each naming the line of both occurrences."""
    problems: list[str] = []
    stack = [root]
    while stack:  # aliases are refused, so the node graph is a tree: each node is visited once
        node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            first: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                stack.append(value_node)
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                line = key_node.start_mark.line + 1
                kept = len(first)
                seen = first.setdefault((key_node.tag, key_node.value), line)
                if len(first) == kept:  # not a new key
                    problems.append(
                        f"{source}:{line}: key {key_node.value!r} repeated (first at line {seen}); "
                        "YAML would keep only the last one"
                    )
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
    return sorted(problems, key=lambda p: int(p[len(source) + 1 :].split(":", 1)[0]))


def line_map(node: yaml.Node, path: str = "", out: Lines | None = None) -> Lines:
    """Map every dotted path in a composed YAML document to its 1-based line."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            sub = f"{path}.{key_node.value}" if path else str(key_node.value)
            out[sub] = key_node.start_mark.line + 1
            line_map(value_node, sub, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            sub = f"{path}[{i}]"
            out[sub] = item.start_mark.line + 1
            line_map(item, sub, out)
    return out

"""Read a config file into plain JSON-like values (dict / list / str / int / float / bool / None).

Format by extension, as Envoy's ``MessageUtil::loadFromFile``: ``.yaml``/``.yml`` is YAML,
``.pb_text`` (text proto) and ``.pb`` (binary proto) are Envoy formats we do not support, and
anything else is JSON. Unlike Envoy (yaml-cpp silently keeps one of them) a duplicate YAML key is
an error: it is always a mistake, and a silent pick hides it.
"""

from __future__ import annotations

import json
import os
from typing import Any, Literal

import yaml

from wasmproxy.config.errors import ConfigError

Format = Literal["yaml", "json"]

_TOO_DEEP = "config is nested too deeply to parse"


def format_for_path(path: str | os.PathLike[str]) -> Format:
    """Envoy's choice of parser by file extension; ConfigError for the proto formats."""
    name = os.fspath(path)
    if name.endswith((".yaml", ".yml")):
        return "yaml"
    if name.endswith(".pb_text") or name.endswith(".pb"):
        raise ConfigError(f"unable to load '{name}': text/binary proto configs (.pb_text, .pb) are not "
                          "supported by wasmproxy; use YAML (.yaml/.yml) or JSON")
    return "json"


def read_config_file(path: str | os.PathLike[str]) -> tuple[Any, Format]:
    """The parsed document and its format. A missing file gives Envoy's ``Invalid path: <path>``."""
    fmt = format_for_path(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise ConfigError(f"Invalid path: {os.fspath(path)}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"unable to read file: {os.fspath(path)}: {e}") from None
    return parse_text(text, fmt), fmt


def parse_text(text: str, fmt: Format) -> Any:
    """Parse YAML or JSON text. An empty document is an empty Bootstrap, as in Envoy."""
    if fmt == "json":
        try:
            return json.loads(text, object_pairs_hook=_json_object_no_duplicates)
        except json.JSONDecodeError as e:
            raise ConfigError(f"Unable to parse JSON as proto (INVALID_ARGUMENT: invalid JSON, near "
                              f"{e.lineno}:{e.colno} (offset {e.pos}): {e.msg})") from None
        except RecursionError:
            raise ConfigError(_TOO_DEEP) from None
    if fmt != "yaml":
        raise ValueError(f"unknown config format {fmt!r} (expected 'yaml' or 'json')")
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        raise ConfigError(_yaml_error_message(e)) from None
    except yaml.YAMLError as e:  # e.g. ReaderError: a control character in the text
        raise ConfigError("yaml: " + " ".join(str(e).split())) from None
    except RecursionError:
        raise ConfigError(_TOO_DEEP) from None
    if node is None:
        return {}
    _check_duplicate_keys(node, "")
    loader = _Loader("")
    try:
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        raise ConfigError(_yaml_error_message(e)) from None
    finally:
        loader.dispose()


def _yaml_error_message(e: yaml.MarkedYAMLError) -> str:
    # yaml-cpp says "yaml-cpp: error at line 3, column 4: illegal block entry"; keep that shape.
    mark = e.problem_mark or e.context_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = e.problem or e.context or "invalid YAML"
    return f"yaml: error{where}: {problem}"


class _Loader(yaml.SafeLoader):  # type: ignore[misc]  # PyYAML ships no type hints
    """SafeLoader without YAML's timestamp type: Envoy (yaml-cpp) keeps ``2024-01-01`` a string."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _check_duplicate_keys(node: yaml.Node, path: str) -> None:
    """Walk the composed node tree (iteratively: configs can be deep) naming any repeated key."""
    stack: list[tuple[yaml.Node, str]] = [(node, path)]
    seen_nodes: set[int] = set()  # anchors/aliases share nodes; visit each once
    while stack:
        current, where = stack.pop()
        if id(current) in seen_nodes:
            continue
        seen_nodes.add(id(current))
        if isinstance(current, yaml.MappingNode):
            first: dict[str, yaml.Node] = {}
            for key_node, value_node in current.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    stack.append((value_node, where))
                    continue
                key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node.start_mark)
                child = f"{where}.{key}" if where else str(key)
                if key in first:
                    prev = first[key].start_mark
                    raise ConfigError(
                        f"duplicate key '{key}' in YAML mapping at line {key_node.start_mark.line + 1}, "
                        f"column {key_node.start_mark.column + 1} (first at line {prev.line + 1})", child)
                first[key] = key_node
                stack.append((value_node, child))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(current.value))


def _json_object_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ConfigError(f"duplicate key '{key}' in JSON object")
        out[key] = value
    return out

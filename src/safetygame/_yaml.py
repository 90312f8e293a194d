"""YAML for the files people edit by hand (policies, tenants): duplicate keys are an error.

PyYAML keeps the last of two equal keys in a mapping without a word, so a pasted block or a
mangled comment can replace a rule unnoticed. :func:`load_yaml` refuses that instead.
"""

from __future__ import annotations

from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode

__all__ = ["load_yaml"]


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then `key: ...` overrides on purpose
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports unhashable keys with its own message
            if key in seen:
                first = seen[key]
                raise ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    f"found duplicate key {key!r} (first at line {first.line + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """``yaml.safe_load`` that raises ``yaml.YAMLError`` on a duplicate mapping key."""
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no arbitrary objects

"""Generate ``docs/configuration.md`` from the configuration schema.

Run ``python -m bridge.config_docs docs/configuration.md`` after changing a field; a test fails
while the file is stale.
"""

from __future__ import annotations

import argparse
import json
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from bridge.config import BridgeConfig

_HEADER = """# Configuration reference

Generated from `src/bridge/config.py` by `python -m bridge.config_docs docs/configuration.md`;
do not edit by hand. Every key below can be set in a YAML file or on the command line with
`--set section.key=value`. Unknown keys are errors.

"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin in (list, tuple):
        return f"list[{', '.join(_type_name(a) for a in args)}]"
    if origin is dict:
        return f"dict[{', '.join(_type_name(a) for a in args)}]"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation)


def _default_text(field: Any, value: Any) -> str:
    if value is PydanticUndefined:
        return "required"
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return f"{len(value)} item(s), see below"
    return f"`{json.dumps(value)}`"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    candidates = [annotation, *typing.get_args(annotation)]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
        for inner in typing.get_args(candidate):
            if isinstance(inner, type) and issubclass(inner, BaseModel):
                return inner
    return None


def _field_default(field: Any) -> Any:
    if field.default_factory is not None:
        return field.default_factory()
    return field.default


def _render_model(
    model: type[BaseModel], prefix: str, instance: BaseModel | None, out: list[str], seen: set[str]
) -> None:
    """Append a section for ``model``; defaults come from ``instance``, the default at this path."""
    out.append(f"## `{prefix or '(top level)'}`\n")
    if model.__doc__:
        out.append(" ".join(model.__doc__.split()) + "\n")
    out.append("| key | type | default | meaning |")
    out.append("| --- | --- | --- | --- |")
    nested: list[tuple[str, type[BaseModel], BaseModel | None]] = []
    for name, field in model.model_fields.items():
        sub = _model_of(field.annotation)
        path = f"{prefix}.{name}" if prefix else name
        value = getattr(instance, name) if instance is not None else _field_default(field)
        meaning = (field.description or "").replace("|", "\\|")
        out.append(f"| `{name}` | {_type_name(field.annotation)} | {_default_text(field, value)} | {meaning} |")
        if sub is not None:
            if typing.get_origin(field.annotation) is list:
                nested.append((f"{path}[]", sub, None))
            else:
                nested.append((path, sub, value if isinstance(value, BaseModel) else None))
    out.append("")
    for path, sub, sub_instance in nested:
        if path not in seen:
            seen.add(path)
            _render_model(sub, path, sub_instance, out, seen)


def render_reference() -> str:
    """Return the Markdown reference of every configuration key."""
    out: list[str] = [_HEADER]
    _render_model(BridgeConfig, "", BridgeConfig(), out, set())
    defaults = BridgeConfig().student.stages
    out.append("## Default curriculum\n")
    out.append("| stage | data | loss | epochs | learning rate |")
    out.append("| --- | --- | --- | --- | --- |")
    for stage in defaults:
        out.append(f"| {stage.name} | {stage.data} | {stage.loss} | {stage.epochs} | {stage.learning_rate} |")
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the configuration reference generated from the schema.")
    parser.add_argument("target", nargs="?", default="docs/configuration.md", help="Markdown file to write.")
    target = Path(parser.parse_args(argv).target)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(render_reference(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

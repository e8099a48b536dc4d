"""python -m deepseek_pt.show_config CONFIG [key.path=value ...] [--key KEY ...]: the config a run would use.

Without --key: every key, defaults filled in, as YAML (what the run directory's config.yaml will hold), after the
validation training runs. With --key (repeatable; a section such as `fp8` stands for all its keys): each key's value
here, its type and default, and its documentation, the text under its field in deepseek_pt/config.py. With
--changed: the keys whose value here is not the default, described as --key describes them."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import inspect
import sys
import typing

import yaml

from . import config as config_module
from .config import Config, ConfigError, differences, key_paths, load_config
from .fileio import stdout_reader_gone


def field_docs() -> dict[str, str]:
    """Every key path of Config -> the docstring under its field in config.py ("" for a field without one)."""
    tree = ast.parse(inspect.getsource(config_module))
    by_class = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            docs = {}
            for stmt, after in zip(node.body, node.body[1:], strict=False):
                if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                        and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                        and isinstance(after.value.value, str)):
                    docs[stmt.target.id] = inspect.cleandoc(after.value.value)
            by_class[node.name] = docs
    out = {}
    for path in key_paths(Config):
        owner, _, f = _field(path)
        out[path] = by_class.get(owner.__name__, {}).get(f.name, "")
    return out


def _field(path: str) -> tuple[type, object, dataclasses.Field]:
    """The dataclass that declares a key path's field, the field's type annotation, and the field."""
    cls, *sections, name = [Config, *path.split(".")]
    for section in sections:
        cls = typing.get_type_hints(cls)[section]
    return cls, typing.get_type_hints(cls)[name], next(f for f in dataclasses.fields(cls) if f.name == name)


def _value(cfg: Config, path: str) -> object:
    for name in path.split("."):
        cfg = getattr(cfg, name)
    return cfg


def _yaml_value(value: object) -> str:
    """A leaf's value as one line of YAML (data.blend's, a list of sources, as a flow sequence of mappings)."""
    if isinstance(value, list):
        value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("\n...")


def describe(cfg: Config, keys: list[str]) -> str:
    """What --key prints for each of `keys` (a key path, or a section for all its keys); ValueError naming a key
    that is neither, with the nearest ones."""
    paths, docs = key_paths(Config), field_docs()
    lines = []
    for key in keys:
        chosen = [p for p in paths if p == key or p.startswith(key + ".")]
        if not chosen:
            near = difflib.get_close_matches(key, paths, n=3, cutoff=0.6)
            raise ValueError(f"--key {key}: no such key or section" + (f"; did you mean {', '.join(near)}?" if near
                                                                        else ""))
        for path in chosen:
            _, tp, f = _field(path)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            lines.append(f"{path}: {_yaml_value(_value(cfg, path))}  ({config_module.type_name(tp)}; default "
                         f"{_yaml_value(default)})")
            lines += [f"    {line}" for line in (docs[path] or "(no documentation)").splitlines()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepseek_pt.show_config", description=__doc__)
    parser.add_argument("config", help="YAML config")
    parser.add_argument("overrides", nargs="*", help="key.path=value")
    parser.add_argument("--key", action="append", default=[], help="a key path or section to describe")
    parser.add_argument("--changed", action="store_true", help="describe the keys set to other than their default")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.changed:
            args.key += [key for key, _, _ in differences(Config(), cfg)]
            if not args.key:
                print("every key has its default")
                return 0
        print(describe(cfg, args.key) if args.key else yaml.safe_dump(cfg.to_dict(), sort_keys=False).rstrip("\n"))
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `... | head`
        return stdout_reader_gone()
    return 0


if __name__ == "__main__":
    sys.exit(main())

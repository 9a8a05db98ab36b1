"""A small Bicep checker against the Bicep compiler's own type definitions (bicep-types-az).

No Bicep compiler is installable here, so this checks what `bicep build` would check for the
templates in infra/, from pycep's parse tree (the parser checkov uses) and the reference data in
../shared/azure-reference/bicep-types (JSON layout: its SOURCE.md):

- every resource names a type@apiVersion that exists, and a `parent:` has the parent type;
- every property path set exists at that version, is not read-only, and literal values have the
  right type and one of the allowed values (string literal unions); variables are followed, both
  branches of `a ? b : c` are checked, other expressions (parameters' values, function calls,
  interpolated strings) only for the path and the kind of value;
- reads like `vault.properties.vaultUri` name a property of the resource type;
- every module call passes only parameters the module declares, all its required ones, literal
  values its `@allowed` lists accept, and `<module>.outputs.<name>` names an output it declares.
"""

import json
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

from lark import Token, Tree
from pycep import BicepParser
from pycep.transformer import BicepElement, BicepToJson

Record = dict[str, Any]

READ_ONLY = 2
# Keys of a resource body that are Bicep's, not the resource type's (depends_on is pycep's).
BICEP_KEYS = {"parent", "scope", "dependsOn", "depends_on"}
KINDS = {"string": "string", "int": "int", "bool": "bool", "object": "object", "array": "array"}


class _Transformer(BicepToJson):
    """pycep keeps only the last nested child resource of a body; this keeps all of them."""

    def object(self, args: list[tuple[str, Any]]) -> dict[str, Any]:
        children = [value for key, value in args if key == "__child_resource__"]
        result = {key: value for key, value in args if key != "__child_resource__"}
        if children:
            result["__child_resources__"] = children
        return result

    def process_child_resource(
        self, parent_resource_name: str, parent_type_api_pair: Any, config: dict[str, Any]
    ) -> None:
        for child in config.pop("__child_resources__", []):
            config["__child_resource__"] = child
            super().process_child_resource(parent_resource_name, parent_type_api_pair, config)


_PARSER = BicepParser(cache=False)


def parse(text: str) -> dict[str, Any]:
    tree: Tree[Token] = _PARSER.lark_parser.parse(text)
    parsed: Any = _Transformer(add_line_numbers=False).transform(tree)
    return dict(parsed)


class TypeIndex:
    """INDEX.tsv and the types.json files it points to, loaded on demand."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.paths: dict[str, str] = {}
        for line in (folder / "INDEX.tsv").read_text().splitlines():
            name, path = line.split("\t")
            self.paths[name.lower()] = path

    @cache  # noqa: B019 - one index per test session
    def records(self, path: str) -> list[Record]:
        records: list[Record] = json.loads((self.folder / path).read_text())
        return records

    def resource_body(self, type_name: str, api_version: str) -> tuple[list[Record], Record] | None:
        key = f"{type_name}@{api_version}".lower()
        if key not in self.paths:
            return None
        records = self.records(self.paths[key])
        (resource,) = [r for r in records if r["$type"] == "ResourceType" and r["name"].lower() == key]
        return records, deref(records, resource["body"])


def deref(records: list[Record], ref: Record) -> Record:
    return records[int(ref["$ref"].removeprefix("#/"))]


def _is_expression(value: Any) -> bool:
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("operator", "function")


def _unwrap(config: Any) -> Any:
    """The body of `[for ...: if (...) {...}]`, `if (...) {...}` or a plain body."""
    while isinstance(config, dict) and "config" in config and ({"loop_type", "condition"} & set(config)):
        config = config["config"]
    return config


def _key(key: str) -> str | None:
    """An object key as written, or None for an interpolated one."""
    if key.startswith("'") and key.endswith("'"):
        key = key[1:-1]
    return None if "${" in key else key


def _chain(value: Any) -> list[str] | None:
    """`a.b[i].c` -> ["a", "b", "c"]; None when the value is not a plain accessor chain."""
    if isinstance(value, BicepElement):
        return [str(value)]
    if isinstance(value, dict) and "operator" in value and len(value) == 1:
        operator = value["operator"]
        operands = operator.get("operands", {})
        if operator["type"] == "property_accessor":
            left, right = _chain(operands["operand_1"]), _chain(operands["operand_2"])
            return left + right if left is not None and right is not None else None
        if operator["type"] == "index_accessor":
            return _chain(operands["operand_1"])
    return None


def _interpolations(text: str) -> Iterator[str]:
    """The expressions inside `${...}` of an interpolated string, quotes and braces respected."""
    start = text.find("${")
    while start != -1:
        depth, quoted, end = 0, False, start + 2
        while end < len(text):
            char = text[end]
            if char == "'":
                quoted = not quoted
            elif not quoted and char == "{":
                depth += 1
            elif not quoted and char == "}":
                if depth == 0:
                    break
                depth -= 1
            end += 1
        yield text[start + 2 : end]
        start = text.find("${", end)


def _values(value: Any) -> Iterator[Any]:
    """Every value in a parse tree, the expressions of interpolated strings parsed too."""
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from _values(item)
    elif isinstance(value, list):
        for item in value:
            yield from _values(item)
    elif isinstance(value, str) and not isinstance(value, BicepElement) and "${" in value:
        for expression in _interpolations(value):
            yield from _values(parse(f"var v = {expression}\n")["variables"]["v"]["value"])


class BicepFile:
    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.tree = parse(text)
        self.params: dict[str, Any] = self.tree.get("parameters", {})
        self.variables: dict[str, Any] = self.tree.get("variables", {})
        self.resources: dict[str, Any] = self.tree.get("resources", {})
        self.modules: dict[str, Any] = self.tree.get("modules", {})
        self.outputs: dict[str, Any] = self.tree.get("outputs", {})


class Checker:
    def __init__(self, types: TypeIndex, files: dict[Path, BicepFile]) -> None:
        self.types = types
        self.files = files
        self.findings: list[str] = []

    def report(self, file: BicepFile, where: str, message: str) -> None:
        self.findings.append(f"{file.path.name}: {where}: {message}")

    # --- values against types ------------------------------------------------------------

    def check_value(
        self, file: BicepFile, records: list[Record], ref: Record, value: Any, where: str
    ) -> None:
        self._check(file, records, deref(records, ref), value, where, set())

    def _check(
        self, file: BicepFile, records: list[Record], type_: Record, value: Any, where: str, seen: set[str]
    ) -> None:
        if value is None:
            return  # null: leave the property unset
        if isinstance(value, BicepElement):
            name = str(value)
            if name in file.variables and name not in seen:
                variable = file.variables[name]["value"]
                self._check(file, records, type_, variable, where, seen | {name})
            elif name in file.params:
                self._check_param(file, records, type_, name, where)
            return
        if _is_expression(value):
            operator = value.get("operator", {})
            if operator.get("type") == "conditional":
                for branch in ("true_value", "false_value"):
                    self._check(file, records, type_, operator["operands"][branch], where, seen)
            return
        if isinstance(value, dict) and {"loop_type", "config"} <= set(value):
            if type_["$type"] == "ArrayType":
                self._check(file, records, deref(records, type_["itemType"]), value["config"], where, seen)
            elif not self._accepts(records, type_, "array", None):
                self.report(
                    file, where, f"a for-expression (array) where {self._describe(records, type_)} goes"
                )
            return
        kind, literal = self._kind(value)
        options = self._flatten(records, type_)
        if kind == "object":
            objects = [t for t in options if t["$type"] in ("ObjectType", "DiscriminatedObjectType")]
            if any(t["$type"] == "AnyType" for t in options):
                return
            if not objects:
                self.report(file, where, f"an object where {self._describe(records, type_)} goes")
                return
            self._check_object(file, records, objects[0], value, where, seen)
            return
        if kind == "array":
            arrays = [t for t in options if t["$type"] == "ArrayType"]
            if any(t["$type"] == "AnyType" for t in options):
                return
            if not arrays:
                self.report(file, where, f"an array where {self._describe(records, type_)} goes")
                return
            item = deref(records, arrays[0]["itemType"])
            for i, element in enumerate(value):
                self._check(file, records, item, element, f"{where}[{i}]", seen)
            return
        if not self._accepts(records, type_, kind, literal):
            shown = repr(literal) if literal is not None else f"a {kind} expression"
            self.report(file, where, f"{shown} is not allowed: expected {self._describe(records, type_)}")

    def _check_param(
        self, file: BicepFile, records: list[Record], type_: Record, name: str, where: str
    ) -> None:
        param = file.params[name]
        allowed = [d["argument"] for d in param["decorators"] if d["type"] == "allowed"]
        if allowed:
            for option in allowed[0]:
                kind, literal = self._kind(option)
                if not self._accepts(records, type_, kind, literal):
                    self.report(
                        file,
                        where,
                        f"param {name} allows {option!r}: expected {self._describe(records, type_)}",
                    )
        elif param.get("type") in KINDS and not self._accepts(records, type_, KINDS[param["type"]], None):
            self.report(
                file, where, f"param {name} is {param['type']}: expected {self._describe(records, type_)}"
            )

    def _check_object(
        self,
        file: BicepFile,
        records: list[Record],
        type_: Record,
        value: dict[str, Any],
        where: str,
        seen: set[str],
    ) -> None:
        properties = self._properties(records, type_, value)
        if type_["$type"] == "DiscriminatedObjectType":
            chosen = {_key(key): item for key, item in value.items()}.get(type_["discriminator"])
            kind, literal = self._kind(chosen)
            if kind == "string" and literal is not None and literal not in type_["elements"]:
                options = " | ".join(repr(e) for e in type_["elements"])
                self.report(file, f"{where}.{type_['discriminator']}", f"{literal!r} is not one of {options}")
                return
        additional = type_.get("additionalProperties")
        for raw_key, item in value.items():
            key = _key(raw_key)
            path = f"{where}.{key if key is not None else raw_key}"
            if key in BICEP_KEYS and where.count(".") == 0:
                continue
            if key is not None and key in properties:
                prop = properties[key]
                if prop.get("flags", 0) & READ_ONLY:
                    self.report(file, path, "read-only property")
                    continue
                self._check(file, records, deref(records, prop["type"]), item, path, seen)
            elif additional is not None:
                self._check(file, records, deref(records, additional), item, path, seen)
            elif key is not None:
                near = [p for p in properties if p.lower() == key.lower()]
                hint = f" (did you mean {near[0]}?)" if near else ""
                self.report(file, path, f"unknown property{hint}")

    def _properties(self, records: list[Record], type_: Record, value: dict[str, Any]) -> dict[str, Record]:
        if type_["$type"] == "ObjectType":
            properties: dict[str, Record] = type_.get("properties", {})
            return properties
        merged = dict(type_.get("baseProperties", {}))
        chosen = {_key(key): item for key, item in value.items()}.get(type_["discriminator"])
        elements = type_["elements"]
        candidates = (
            [elements[chosen]]
            if isinstance(chosen, str) and not isinstance(chosen, BicepElement) and chosen in elements
            else list(elements.values())
        )
        for ref in candidates:
            merged.update(deref(records, ref).get("properties", {}))
        return merged

    def _flatten(self, records: list[Record], type_: Record) -> list[Record]:
        if type_["$type"] == "UnionType":
            return [t for ref in type_["elements"] for t in self._flatten(records, deref(records, ref))]
        return [type_]

    def _accepts(self, records: list[Record], type_: Record, kind: str, literal: Any) -> bool:
        for option in self._flatten(records, type_):
            match option["$type"]:
                case "AnyType":
                    return True
                case "StringLiteralType" if kind == "string":
                    if literal is None or literal == option["value"]:
                        return True
                case "StringType" if kind == "string":
                    if literal is None:
                        return True
                    if option.get("minLength", 0) <= len(literal) <= option.get("maxLength", len(literal)):
                        return True
                case "IntegerType" if kind == "int":
                    low, high = option.get("minValue"), option.get("maxValue")
                    if literal is None or (
                        (low is None or literal >= low) and (high is None or literal <= high)
                    ):
                        return True
                case "BooleanType" if kind == "bool":
                    return True
                case "ObjectType" | "DiscriminatedObjectType" if kind == "object":
                    return True
                case "ArrayType" if kind == "array":
                    return True
        return False

    def _describe(self, records: list[Record], type_: Record) -> str:
        names = []
        for option in self._flatten(records, type_):
            if option["$type"] == "StringLiteralType":
                names.append(repr(option["value"]))
            else:
                names.append(option.get("name") or option["$type"].removesuffix("Type").lower())
        return " | ".join(names)

    @staticmethod
    def _kind(value: Any) -> tuple[str, Any]:
        """The kind of a literal and its value (None when only the kind is known)."""
        if isinstance(value, BicepElement):
            return "expression", None
        if isinstance(value, bool):
            return "bool", value
        if isinstance(value, int):
            return "int", value
        if isinstance(value, str):
            return "string", None if "${" in value else value
        if isinstance(value, list):
            return "array", None
        return "object", None

    # --- resources, modules, references ------------------------------------------------

    def check_file(self, file: BicepFile) -> None:
        for symbol, resource in file.resources.items():
            self.check_resource(file, symbol, resource)
        for symbol, module in file.modules.items():
            self.check_module(file, symbol, module)
        self.check_references(file)

    def check_resource(self, file: BicepFile, symbol: str, resource: dict[str, Any]) -> None:
        type_name, version = resource["type"], resource["api_version"]
        found = self.types.resource_body(type_name, version)
        if found is None:
            self.report(file, symbol, f"{type_name}@{version} is not a known resource type and API version")
            return
        body = _unwrap(resource["config"])
        parent = body.get("parent")
        if isinstance(parent, BicepElement):
            parent_type = file.resources.get(str(parent), {}).get("type", "")
            if parent_type.lower() != type_name.rsplit("/", 1)[0].lower():
                self.report(
                    file,
                    symbol,
                    f"parent {parent} is {parent_type or 'not a resource'}, not the parent of {type_name}",
                )
        records, body_type = found
        if resource["existing"]:
            body = {key: value for key, value in body.items() if key in ("name", *BICEP_KEYS)}
        self._check_object(file, records, body_type, body, symbol, set())

    def check_module(self, file: BicepFile, symbol: str, module: dict[str, Any]) -> None:
        if module.get("type") != "local":
            return
        target = self.files.get((file.path.parent / module["detail"]["path"]).resolve())
        if target is None:
            self.report(file, symbol, f"module file {module['detail']['path']} not found")
            return
        params = _unwrap(module["config"]).get("params", {})
        for name, value in params.items():
            if name not in target.params:
                self.report(file, symbol, f"unknown param {name} of {target.path.name}")
                continue
            allowed = [d["argument"] for d in target.params[name]["decorators"] if d["type"] == "allowed"]
            kind, literal = self._kind(value)
            if allowed and kind in ("string", "int") and literal is not None and literal not in allowed[0]:
                self.report(file, f"{symbol}.params.{name}", f"{literal!r} is not in @allowed {allowed[0]}")
        for name, param in target.params.items():
            if param.get("default") is None and name not in params:
                self.report(file, symbol, f"required param {name} of {target.path.name} not given")

    def check_references(self, file: BicepFile) -> None:
        for value in _values(file.tree):
            chain = _chain(value) if isinstance(value, dict) else None
            if not chain or len(chain) < 2:
                continue
            base, rest = chain[0], chain[1:]
            if base in file.modules and rest[0] == "outputs" and len(rest) > 1:
                module = file.modules[base]
                target = self.files.get((file.path.parent / module["detail"]["path"]).resolve())
                if target is not None and rest[1] not in target.outputs:
                    self.report(
                        file, f"{base}.outputs.{rest[1]}", f"{target.path.name} has no output {rest[1]}"
                    )
            elif base in file.resources:
                self._check_read(file, base, rest)

    def _check_read(self, file: BicepFile, symbol: str, path: list[str]) -> None:
        resource = file.resources[symbol]
        found = self.types.resource_body(resource["type"], resource["api_version"])
        if found is None:
            return  # reported with the resource
        records, type_ = found
        for i, key in enumerate(path):
            objects = [
                t
                for t in self._flatten(records, type_)
                if t["$type"] in ("ObjectType", "DiscriminatedObjectType")
            ]
            if not objects:
                return
            properties = self._properties(records, objects[0], {})
            if key not in properties:
                if objects[0].get("additionalProperties") is None:
                    self.report(
                        file, ".".join([symbol, *path[: i + 1]]), f"{resource['type']} has no property {key}"
                    )
                return
            type_ = deref(records, properties[key]["type"])


def check(infra: Path, types: TypeIndex) -> list[str]:
    """Findings for every .bicep file under infra (an empty list: nothing to fix)."""
    files = {path.resolve(): BicepFile(path, path.read_text()) for path in sorted(infra.rglob("*.bicep"))}
    checker = Checker(types, files)
    for file in files.values():
        checker.check_file(file)
    return checker.findings

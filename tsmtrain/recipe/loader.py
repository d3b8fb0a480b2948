"""Reading a recipe file: strict YAML, command-line overrides, validation, file checks.

:func:`load_recipe` reads the YAML file, applies ``--set`` overrides and flags, validates the
result against :class:`~tsmtrain.recipe.schema.Recipe` and checks the files it names, collecting
*every* problem before raising one :class:`~tsmtrain.recipe.problems.RecipeError`.

The YAML itself is read strictly: UTF-8 text only, each key once per mapping (a second
``model:`` section is an error, not a silent replacement), and anchors/aliases within a small
bound (an alias bomb is refused before it is expanded); no base-60 numbers (``1:30:00`` stays a
string). :func:`yaml_load` and :func:`line_index` give the same reading to other YAML files
(the scaling model's network file).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .label_map import ClassNamesError, read_class_names
from .problems import _MISSING, Problem, RecipeError, _cut, _not_utf8, _shown, validation_problems
from .schema import ModelConfig, Recipe, control_character

__all__ = ["load_recipe", "apply_overrides", "yaml_load", "line_index"]


_MAX_ALIASES = 100
"""Aliases (``*name``) one YAML document may use: a recipe needs a handful."""
_MAX_DEPTH = 50
"""Levels of nesting, aliases expanded: a recipe has three or four."""
_MAX_NODES = 10_000
"""Nodes (mappings, sequences, scalars) of one YAML document once its aliases are expanded. An
alias bomb (each level naming the previous one many times) stays a few lines of text but
expands exponentially; it is measured on the composed node graph, in time linear in the text,
and refused before anything is expanded."""
_MERGE = "tag:yaml.org,2002:merge"


class _Refused(yaml.MarkedYAMLError):
    """YAML that parses but that tsmtrain refuses to read: too many aliases, nesting too deep,
    a recursive alias, more than :data:`_MAX_NODES` nodes once expanded, or a duplicate key.
    ``why`` says which, ``key`` is the dotted key path where there is one, ``line`` is 1-based."""

    def __init__(self, why: str, mark: yaml.Mark, key: str = ""):
        super().__init__(problem=f"{key}: {why}" if key else why, problem_mark=mark)
        self.why, self.key, self.line = why, key, mark.line + 1


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader without base-60 numbers: YAML 1.1 reads ``time: 1:30:00`` as the
    integer 5400, which would turn a Slurm time limit into seconds. Here it stays a string.

    While composing, it refuses (:class:`_Refused`) more than :data:`_MAX_ALIASES` aliases and
    nesting deeper than :data:`_MAX_DEPTH`; a value that cannot be built (a timestamp with
    month 13, an integer of 5,000 digits) is a ``ConstructorError`` naming its line, not a
    ``ValueError``. Use it through :func:`_compose` and :func:`_construct`."""

    def __init__(self, stream: str):
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        if self.check_event(yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > _MAX_ALIASES:
                raise _Refused(f"more than {_MAX_ALIASES} aliases (*name); refused, as an alias bomb would exhaust "
                               "memory (a recipe needs a handful)",
                               self.peek_event().start_mark)
            return super().compose_node(parent, index)
        if self._depth >= _MAX_DEPTH:
            raise _Refused(f"nested more than {_MAX_DEPTH} levels deep (a recipe needs three or four)",
                           self.peek_event().start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:
            value = node.value if isinstance(node, yaml.ScalarNode) else node.tag
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {_shown(value)} as {node.tag.rsplit(':', 1)[-1]}: {_cut(str(exc))}",
                node.start_mark) from None


_RecipeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers
            if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)"
               r"|\.[0-9_]+(?:[eE][-+][0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+0123456789."),
)


def _compose(text: str) -> yaml.Node | None:
    """The node graph of the one YAML document in ``text`` (None when it is empty), aliases
    still shared, checked by :func:`_check_expansion`.

    Raises:
        yaml.YAMLError: not valid YAML, or (:class:`_Refused`) too many aliases, too deep, or
            too large once expanded.
    """
    loader = _RecipeLoader(text)
    try:
        root = loader.get_single_node()
    finally:
        loader.dispose()
    if root is not None:
        _check_expansion(root)
    return root


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return node.value
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a node graph that aliases would expand to more than :data:`_MAX_NODES` nodes or
    :data:`_MAX_DEPTH` levels, or that contains itself. Each distinct node's expanded size is
    computed once (memoised, iteratively), so a bomb is measured in time linear in its text.

    Raises:
        _Refused: naming the line of the first (innermost) node over a bound.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_nodes: set[int] = set()  # the nodes whose children are being measured: the path from the root
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, measured = stack.pop()
        kids = _children(node)
        if measured:
            open_nodes.discard(id(node))
            size[id(node)] = 1 + sum(size[id(k)] for k in kids)
            depth[id(node)] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[id(node)] > _MAX_NODES:
                raise _Refused(f"aliases (*name) expand this to more than {_MAX_NODES:,} values (an alias bomb?); "
                               "refused before expanding, as expanding would exhaust memory",
                               node.start_mark)
            if depth[id(node)] > _MAX_DEPTH:
                raise _Refused(f"aliases (*name) nest this more than {_MAX_DEPTH} levels deep (a recipe needs "
                               "three or four)", node.start_mark)
            continue
        if id(node) in size:
            continue
        if id(node) in open_nodes:
            raise _Refused("an alias (*name) inside the node it names: a recursive structure",
                           node.start_mark)
        open_nodes.add(id(node))
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in size)


def _scan(root: yaml.Node) -> tuple[dict[str, int], list[tuple[str, yaml.Node, int]]]:
    """Walk a graph that :func:`_compose` checked (so at most :data:`_MAX_NODES` nodes expanded).

    Returns:
        The 1-based line of every dotted key path (merged keys, ``<<: *base``, at the line
        where the base names them, unless the mapping names them itself), and every duplicate
        key as ``(key path, key node, line of its first occurrence)``, each mapping checked once.
    """
    index: dict[str, int] = {}
    duplicates: list[tuple[str, yaml.Node, int]] = []
    checked: set[int] = set()
    keys = _RecipeLoader("")

    def identity(key: yaml.Node) -> Any:
        """What the key becomes in the dict (``1`` and ``0x1`` collide; ``1`` and ``'1'`` do not)."""
        if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE:
            try:
                value = keys.construct_object(key)
                hash(value)
                return ("value", value)
            except Exception:
                return ("text", key.tag, key.value)
        return ("node", id(key)) if key.tag != _MERGE else ("merge",)

    def name(key: yaml.Node) -> str:
        return str(key.value) if isinstance(key, yaml.ScalarNode) else "(complex key)"

    def walk(node: yaml.Node, prefix: str, indexed: bool) -> None:
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{prefix}{i}.", False)
            return
        if not isinstance(node, yaml.MappingNode):
            return
        if id(node) not in checked:
            checked.add(id(node))
            first: dict[Any, int] = {}
            for key, _ in node.value:
                ident = identity(key)
                if ident in first:
                    duplicates.append((prefix + name(key), key, first[ident]))
                else:
                    first[ident] = key.start_mark.line + 1
        for key, value in node.value:  # merged keys first: the mapping's own keys override them
            if key.tag == _MERGE:
                for base in value.value if isinstance(value, yaml.SequenceNode) else [value]:
                    walk(base, prefix, indexed)
        for key, value in node.value:
            if key.tag != _MERGE:
                path = prefix + name(key)
                if indexed:
                    index[path] = key.start_mark.line + 1
                walk(value, path + ".", indexed)

    try:
        walk(root, "", True)
    finally:
        keys.dispose()
    duplicates.sort(key=lambda d: d[1].start_mark.index)
    return index, duplicates


def _construct(root: yaml.Node) -> Any:
    """The Python value of a node graph that :func:`_compose` checked.

    Raises:
        yaml.YAMLError: a value that cannot be built (unhashable key, impossible timestamp).
    """
    loader = _RecipeLoader("")
    try:
        return loader.construct_document(root)
    finally:
        loader.dispose()


def yaml_load(text: str) -> Any:
    """Read one YAML document as recipes are read (no base-60 numbers; aliases, nesting and
    expanded size bounded; duplicate keys refused).

    Raises:
        yaml.YAMLError: not valid YAML, or refused (:class:`_Refused`, naming the first
            duplicate key or the bound exceeded and its line).
    """
    root = _compose(text)
    if root is None:
        return None
    _, duplicates = _scan(root)
    if duplicates:
        key, node, first = duplicates[0]
        raise _Refused(f"duplicate key (first at line {first})", node.start_mark, key)
    return _construct(root)


def line_index(text: str) -> dict[str, int]:
    """Map dotted key paths of a YAML document to their 1-based line numbers ({} when the text
    is not YAML that :func:`yaml_load` reads; never expands more than :data:`_MAX_NODES` nodes)."""
    try:
        root = _compose(text)
    except yaml.YAMLError:
        return {}
    return _scan(root)[0] if root is not None else {}


def _set_path(doc: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    node = doc
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise KeyError(path)
        node = child
    node[parts[-1]] = value


def apply_overrides(doc: dict, overrides: list[str], source: str = "--set") -> list[Problem]:
    """Apply ``a.b=value`` overrides to a raw recipe dict in place.

    Values are parsed as YAML (``8`` is an int, ``false`` a bool, ``[1,2]`` a list; text that is
    not YAML stays a string). Returns the malformed overrides as problems (no ``=``, a value
    with a duplicate key or too many aliases); unknown keys are caught by validation.
    """
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not p for p in key.split(".")):
            problems.append(Problem(source, item, _MISSING, "expected KEY.PATH=VALUE"))
            continue
        try:
            value = yaml_load(raw) if raw.strip() else None
        except _Refused as exc:
            problems.append(Problem(source, key, _MISSING, f"value refused: {exc.problem}"))
            continue
        except yaml.YAMLError:
            value = raw
        try:
            _set_path(doc, key, value)
        except KeyError:
            problems.append(Problem(source, key, value, "a parent of this key is not a section"))
    return problems


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, check_files: bool = True,
                flags: dict[str, tuple[str, Any]] | None = None) -> Recipe:
    """Read, override, validate and check a recipe file.

    Args:
        path: the YAML recipe.
        overrides: ``a.b=value`` strings applied on top of the file (``--set``).
        check_files: also check that the list files and checkpoint the recipe names exist
            (list files are not required when ``data.generate`` will create them).
        flags: typed values from command-line flags, ``{"cluster.nodes": ("--nodes", 4)}``,
            applied last; a problem with one names the flag.

    Returns:
        The validated :class:`Recipe`.

    Raises:
        RecipeError: with one :class:`Problem` per unknown key, wrong type, missing file or
            impossible combination, all collected before raising. Before any of those: one
            problem when the file cannot be read, is not UTF-8 text (the byte, its offset and
            line), is not valid YAML, or uses aliases (``*name``) beyond a small bound (more than
            100, or expanding to more than 10,000 values: an alias bomb); one per duplicate key
            (naming both lines).
    """
    file = str(path)
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise RecipeError([Problem(file, "(file)", _MISSING, f"cannot read recipe: {exc.strerror or exc}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RecipeError([Problem(file, "", _MISSING, _not_utf8(data, exc))]) from None
    try:
        root = _compose(text)
        lines, duplicates = _scan(root) if root is not None else ({}, [])
        if duplicates:
            raise RecipeError([Problem(file, key, _MISSING, f"duplicate key (first at line {first}); a recipe "
                                                            "names each key once", node.start_mark.line + 1)
                               for key, node, first in duplicates])
        doc = (_construct(root) if root is not None else None) or {}
    except _Refused as exc:
        raise RecipeError([Problem(file, "(yaml)", _MISSING, exc.why, exc.line)]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        reason = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise RecipeError([Problem(file, "(yaml)", _MISSING, f"not valid YAML: {reason}", line)]) from None
    if not isinstance(doc, dict):
        raise RecipeError([Problem(file, "(top level)", _MISSING, "a recipe is a mapping of sections")])
    overrides = list(overrides or [])
    problems = apply_overrides(doc, overrides)
    overridden = {o.partition("=")[0].strip(): "--set" for o in overrides}
    for key, (flag, value) in (flags or {}).items():
        _set_path(doc, key, value)
        overridden[key] = flag
    if check_files:
        problems += _check_files(doc, file, lines, overridden)
    try:
        recipe = Recipe.model_validate(doc)
    except ValidationError as err:
        raise RecipeError(problems + validation_problems(err, Recipe, file, lines, overridden)) from None
    if problems:
        raise RecipeError(problems)
    return recipe


def _check_files(doc: dict, file: str, lines: dict[str, int], overridden: dict[str, str]) -> list[Problem]:
    """Missing files and folders the recipe names. Works on the raw document, so that it can
    run even when the schema found problems (every problem is reported in one go)."""
    problems = []

    def get(key: str) -> Any:
        node: Any = doc
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            section, name = key.split(".")
            field = Recipe.model_fields[section].annotation.model_fields[name]
            node = None if field.is_required() else field.default
        return node if isinstance(node, str) else None

    def missing(key: str, value: str, what: str) -> None:
        if control_character(value):  # the schema names the control character: one line, not two
            return
        src = overridden.get(key, file)
        problems.append(Problem(src, key, value, f"{what} not found", lines.get(key) if src == file else None))

    generate = get("data.generate")
    if generate == "arrow_of_time" and not Path(get("data.source")).is_dir():
        missing("data.source", get("data.source"), "clips folder")
    if generate is None:
        root = Path(get("data.root"))
        if not (root.is_dir() or (root.suffix == ".json" and root.is_file())):
            missing("data.root", get("data.root"), "folder (or shard index .json file)")
        for key in ("data.train_list", "data.val_list"):
            if get(key) is not None and not Path(get(key)).is_file():
                missing(key, get(key), "list file")
    features = get("data.features")
    if features is not None and not (Path(features) / "train" / "index.json").is_file():
        missing("data.features", features, f"features index {Path(features) / 'train' / 'index.json'} (written last "
                                           f"by tsmtrain extract RECIPE --out {features}, which resumes)")
    elif features is not None:
        why = _features_mismatch(Path(features) / "train" / "index.json", doc)
        if why:
            src = overridden.get("data.features", file)
            problems.append(Problem(src, "data.features", features, why,
                                    lines.get("data.features") if src == file else None))
    if get("model.pretrained") and not Path(get("model.pretrained")).is_file():
        missing("model.pretrained", get("model.pretrained"), "checkpoint file")
    classes = get("data.classes")
    if classes is not None:
        if not Path(classes).is_file():
            missing("data.classes", classes, "label map file")
        else:
            num_classes = (doc.get("model") or {}).get("num_classes") if isinstance(doc.get("model"), dict) else None
            if num_classes is None:
                num_classes = ModelConfig.model_fields["num_classes"].default
            try:
                read_class_names(classes, num_classes if isinstance(num_classes, int) else None)
            except ClassNamesError as err:
                src = overridden.get("data.classes", file)
                problems.append(Problem(src, "data.classes", classes, str(err),
                                        lines.get("data.classes") if src == file else None))
    return problems


def _features_mismatch(index_file: Path, doc: dict) -> str | None:
    """Why a features index (``tsmtrain extract``'s) does not fit the raw recipe ``doc``'s
    ``model.num_classes`` and ``model.loss`` (its labels would not be the recipe's); None when it fits."""
    try:
        index = json.loads(index_file.read_text())
        theirs = (int(index["num_classes"]), bool(index["multi_label"]))
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{index_file}: not a features index ({type(err).__name__}: {err}); extract again"
    model = doc.get("model") if isinstance(doc.get("model"), dict) else {}
    k = model.get("num_classes", ModelConfig.model_fields["num_classes"].default)
    multi = model.get("loss", ModelConfig.model_fields["loss"].default) == "sigmoid"
    if theirs != (k, multi):
        kind = {True: "multi", False: "single"}
        return (f"{index_file} holds features of {theirs[0]} classes ({kind[theirs[1]]}-label), the recipe has "
                f"model.num_classes {k} ({kind[multi]}-label, model.loss)")
    return None

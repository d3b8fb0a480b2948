"""Print the recipe reference (every section and field, with type, default, description) as
Markdown, from the pydantic schema in tsmtrain/recipe.py. README.md's reference is this output:

    python scripts/recipe_reference.py
"""

import types
import typing

from pydantic_core import PydanticUndefined

from tsmtrain.recipe import Recipe


def type_name(annotation) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Literal:
        return " / ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("none" if a is type(None) else type_name(a) for a in args)
    if origin in (list, tuple):
        inner = ", ".join(type_name(a) for a in args if a is not Ellipsis)
        return f"{origin.__name__}[{inner}]"
    return getattr(annotation, "__name__", str(annotation))


def main() -> None:
    for section, field in Recipe.model_fields.items():
        model = field.annotation
        print(f"### `{section}`: {model.__doc__.strip().splitlines()[0]}\n")
        print("| key | type | default | description |\n|---|---|---|---|")
        for name, f in model.model_fields.items():
            default = "required" if f.default is PydanticUndefined else f"`{f.default!r}`"
            print(f"| `{section}.{name}` | {type_name(f.annotation)} | {default} | {f.description} |")
        print()


if __name__ == "__main__":
    main()

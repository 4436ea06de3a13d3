"""Every public name of `eqx_mtp` has an entry in the API reference: a
`::: eqx_mtp.<name>` line on some docs page, which mkdocstrings renders."""

import ast
import pathlib
import re
import types

import eqx_mtp

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _foreign_module(module: types.ModuleType, value) -> bool:
    # A module that is not a subpackage, e.g. `jaxtyping`, which jaxtyping's import
    # hook (on in the test suite) adds to every module it instruments.
    return isinstance(value, types.ModuleType) and not value.__name__.startswith(
        module.__name__ + "."
    )


def public_names(module: types.ModuleType) -> set[str]:
    """`dir(module)` without private names and `__version__`, and every name its
    `__init__.py` re-exports (`from .x import y as y`), read from the source."""
    names = {
        n
        for n in dir(module)
        if not n.startswith("_") and not _foreign_module(module, getattr(module, n))
    }
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            names |= {a.asname or a.name for a in node.names}
    return {n for n in names if not n.startswith("_")}


def documented() -> set[str]:
    """The dotted names of every `::: ` entry under `docs/`."""
    entries = set()
    for page in (ROOT / "docs").rglob("*.md"):
        entries |= set(re.findall(r"^::: (\S+)", page.read_text(), re.MULTILINE))
    return entries


def undocumented(module: types.ModuleType, prefix: str, entries: set[str]) -> list:
    """The public names of `module` (as `prefix.name`) without an entry. A public
    subpackage (`eqx_mtp.train`) counts as documented when each of its own public
    names is, under its own path or as the same object re-exported at the top."""
    missing = []
    for name in sorted(public_names(module)):
        path = f"{prefix}.{name}"
        value = getattr(module, name)
        if path in entries:
            continue
        if isinstance(value, types.ModuleType):
            missing += undocumented(value, path, entries)
            continue
        top = getattr(eqx_mtp, name, None)
        if top is value and f"eqx_mtp.{name}" in entries:
            continue  # re-exported at the top and documented there
        missing.append(path)
    return missing


def test_every_public_name_has_an_api_entry():
    missing = undocumented(eqx_mtp, "eqx_mtp", documented())
    assert not missing, "no `::: <name>` entry in docs/: " + ", ".join(missing)


def test_the_names_are_found():
    # The listing itself: re-exports of each kind, and the training subpackage.
    names = public_names(eqx_mtp)
    assert {"mtp_loss", "MTPModel", "BOS_ID", "DEFAULT_RULES", "train"} <= names
    assert "__version__" not in names
    assert not any(n.startswith("_") for n in names)

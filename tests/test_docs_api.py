"""The API reference: one page per public namespace (`eqx_mtp`, `eqx_mtp.nn`,
`eqx_mtp.interop`, `eqx_mtp.train`), on which every name the namespace exports has a
`::: <namespace>.<name>` entry (which mkdocstrings renders) and nothing else does;
each name is documented exactly once in all of `docs/`, at its public path. And the
docs cite only what their reader can open."""

import ast
import importlib
import pathlib
import re
import types

import pytest

import eqx_mtp

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
API_PAGES = {
    "eqx_mtp": "api/eqx_mtp.md",
    "eqx_mtp.nn": "api/nn.md",
    "eqx_mtp.interop": "api/interop.md",
    "eqx_mtp.train": "api/train.md",
}


def _foreign_module(module: types.ModuleType, value) -> bool:
    # A module that is not a subpackage, e.g. `importlib` (imported by `eqx_mtp`'s
    # `__init__`) or `jaxtyping`, which jaxtyping's import hook (on in the test
    # suite) adds to every module it instruments.
    return isinstance(value, types.ModuleType) and not value.__name__.startswith(
        module.__name__ + "."
    )


def public_names(module: types.ModuleType) -> set[str]:
    """The names `module` offers its users, subpackages excluded: `dir(module)`
    without private names, and every name its `__init__.py` re-exports (`from .x
    import y as y`), read from the source."""
    names = {
        n
        for n in dir(module)
        if not n.startswith("_") and not _foreign_module(module, getattr(module, n))
    }
    tree = ast.parse(pathlib.Path(module.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            names |= {a.asname or a.name for a in node.names}
    return {
        n
        for n in names
        if not n.startswith("_")
        and not isinstance(getattr(module, n), types.ModuleType)
    }


def entries(text: str) -> list[str]:
    """The dotted names of a page's `::: ` entries, in order, repeats kept."""
    return re.findall(r"^::: (\S+)", text, re.MULTILINE)


def all_entries() -> dict[str, list[str]]:
    """`{page relative to docs/: its entries}` for every page under `docs/`."""
    return {
        page.relative_to(DOCS).as_posix(): entries(page.read_text())
        for page in sorted(DOCS.rglob("*.md"))
    }


@pytest.mark.parametrize("namespace", sorted(API_PAGES))
def test_api_page_documents_its_namespace_exactly(namespace):
    module = importlib.import_module(namespace)
    exported = {f"{namespace}.{n}" for n in public_names(module)}
    documented = set(entries((DOCS / API_PAGES[namespace]).read_text()))
    missing, extra = exported - documented, documented - exported
    assert not missing, f"docs/{API_PAGES[namespace]} lacks `::: {sorted(missing)}`"
    assert not extra, (
        f"docs/{API_PAGES[namespace]} documents {sorted(extra)}, which "
        f"`{namespace}` does not export"
    )


def test_every_name_is_documented_once_on_an_api_page():
    pages = all_entries()
    outside = {p: e for p, e in pages.items() if e and p not in API_PAGES.values()}
    assert not outside, f"`:::` entries outside the API pages: {outside}"
    every = [e for page_entries in pages.values() for e in page_entries]
    repeated = sorted({e for e in every if every.count(e) > 1})
    assert not repeated, f"documented more than once: {repeated}"


def test_the_names_are_found():
    # The listing itself, independently of the pages: re-exports of each kind, the
    # subpackages left to their own pages, nothing private.
    top = public_names(eqx_mtp)
    assert {"mtp_loss", "MTPModel", "DEFAULT_RULES", "MESH_AXES"} <= top
    assert not {"nn", "interop", "train", "importlib", "__version__"} & top
    assert {"BOS_ID", "train", "TrainConfig"} <= public_names(eqx_mtp.train)
    assert {"Transformer", "blockwise_attention"} <= public_names(eqx_mtp.nn)
    assert {"load_llama", "WeightsError"} <= public_names(eqx_mtp.interop)
    for namespace in API_PAGES:
        names = public_names(importlib.import_module(namespace))
        assert not any(n.startswith("_") for n in names), namespace


def test_nav_lists_every_page_once():
    """Every page under `docs/` is reachable from the navigation, once, and the
    navigation names no page that is not there."""
    yaml = pytest.importorskip("yaml")  # mkdocs' and orbax's dependency
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())

    def pages(nav) -> list[str]:
        if isinstance(nav, str):
            return [nav]
        if isinstance(nav, list):
            return [p for item in nav for p in pages(item)]
        return [p for value in nav.values() for p in pages(value)]

    listed = pages(config["nav"])
    assert len(listed) == len(set(listed)), listed
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert set(listed) == on_disk
    assert listed[-len(API_PAGES) :] == list(API_PAGES.values())


# What a reader of the docs cannot open: the team's own notes and its issue tracker's
# numbers; a path into `tests/` (the README, read in the repository, may name one).
UNREADABLE = re.compile(r"DESIGN\.md|STYLE\.md|\bissues? #?\d+|#\d{2,}\b|`tests/")


def test_docs_cite_only_what_a_reader_can_open():
    cited = []
    for page in sorted(DOCS.rglob("*.md")) + [ROOT / "README.md"]:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            match = UNREADABLE.search(line)
            if match and not (page.name == "README.md" and "tests/" in match[0]):
                cited.append(f"{page.relative_to(ROOT)}:{number}: {match[0]}")
    assert not cited, "\n".join(cited)


def test_readme_links_resolve():
    # mkdocs checks the links between docs pages; the README, read in the
    # repository, links into `docs/` by path, which nothing else checks.
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", readme)
    assert len(targets) >= 10, targets
    broken = [t for t in targets if "://" not in t and not (ROOT / t).is_file()]
    assert not broken, broken

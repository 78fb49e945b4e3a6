"""The guards of the layout: arrows only point down, no circle, wsproto's privates pinned.

The modules are read with :mod:`ast`, never imported, so a test here fails the
same way whatever the import order or the optional packages installed.

The layer order is the one ``/work/shared/guide/architecture.md`` draws (see
also ``docs/topics/design.rst``), as it applies to today's files, from the
bottom (0) up. A module may import modules of its own layer or of a lower one.
Names of modules that do not exist yet (``_transport``, ``_keepalive``,
``_dispatch``, ``_request``, ``_backplane``, ``_auth``) are placed already, so
that a module moving into its room needs no change here.

The last tests check that the private wsproto names ``_sansio/deflate.py``
relies on still exist, and that pyproject.toml bounds wsproto's version.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = "wsnursery"
SRC = Path(__file__).resolve().parent.parent / "src" / PACKAGE

#: Bottom first. A module's layer is found by its first name under wsnursery
#: (``_sansio`` for ``wsnursery._sansio.protocol``; ``_cli`` for a module or a
#: package of that name).
LAYERS: list[set[str]] = [
    {"_sansio"},  # the protocol, handshake, exceptions, backoff: no I/O, no trio
    {"_util", "_tls", "_transport"},  # trio helpers, TLS contexts, the socket fast path
    {"_connection"},  # one connection: read step, the one write path, ping/pong/close
    {"_keepalive"},
    {"_client", "_reconnect"},
    {"_broadcast"},
    # The backplanes implement the Backplane ABC that _broadcast defines, so they
    # sit above it (the guide draws them below; an arrow up would be needed).
    {"_backplane", "_backplane_envelope", "_redis"},
    {"_dispatch"},
    # The request sits below the handler (the guide draws it above): hooks
    # name WebSocketRequest in their signatures, and the request needs nothing
    # of the handler module.
    {"_request"},
    {"_handler", "_auth"},
    {"_server"},
    {"testing"},
    {"_cli", "__main__"},
    {"__init__"},  # the public face re-exports every layer
]

#: Known arrows up, (importer, imported) by layer name, that other work on
#: issue 11 removes. Each must still exist (the test says when one is gone, so
#: that this list only shrinks).
UPWARD_ALLOWED: set[tuple[str, str]] = {
    # _connection names WebSocketHandler in annotations (TYPE_CHECKING): the
    # hook loop moving to _dispatch.py removes it.
    ("_connection", "_handler"),
}

#: What a module under _sansio/ may import besides the standard library (and
#: the modules under these names): websockets.speedups is the optional C XOR
#: (a pure function, no I/O), not the websockets package's I/O layers.
SANSIO_THIRD_PARTY = {"wsproto", "h11", "websockets.speedups"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(SRC.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _walk(node: ast.AST, type_checking: bool) -> Iterator[tuple[ast.AST, bool]]:
    """Every node under ``node``, with whether it sits in an ``if TYPE_CHECKING:`` body."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for stmt in child.body:
                yield stmt, True
                yield from _walk(stmt, True)
            for stmt in child.orelse:
                yield stmt, type_checking
                yield from _walk(stmt, type_checking)
        else:
            yield child, type_checking
            yield from _walk(child, type_checking)


def imports(name: str, path: Path, known: set[str]) -> Iterator[tuple[str, bool]]:
    """(imported module, under TYPE_CHECKING) for each import in a module.

    Relative imports are resolved; ``from . import x`` names the module ``x``
    when there is one.
    """
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    for node, type_checking in _walk(tree, False):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, type_checking
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level > 1:
                    base_parts = base_parts[: -(node.level - 1)]
                base = ".".join(base_parts)
                target = f"{base}.{node.module}" if node.module else base
            else:
                assert node.module is not None
                target = node.module
            yield target, type_checking
            for alias in node.names:
                if f"{target}.{alias.name}" in known:
                    yield f"{target}.{alias.name}", type_checking


def graph() -> dict[str, list[tuple[str, bool]]]:
    found = modules()
    known = set(found)
    return {name: list(imports(name, path, known)) for name, path in found.items()}


def layer_name(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == PACKAGE
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(module: str) -> int:
    name = layer_name(module)
    for index, layer in enumerate(LAYERS):
        if name in layer:
            return index
    raise AssertionError(f"{module} is in no layer: add {name!r} to LAYERS in {__file__}")


def test_the_modules_are_found() -> None:
    found = modules()
    assert "wsnursery._sansio.protocol" in found
    assert "wsnursery" in found
    assert len(found) > 10


def test_sansio_imports_only_the_standard_library_wsproto_h11_and_itself() -> None:
    allowed_roots = set(sys.stdlib_module_names) | {"__future__"}
    allowed = SANSIO_THIRD_PARTY
    wrong = []
    for module, edges in graph().items():
        if not module.startswith(f"{PACKAGE}._sansio"):
            continue
        for target, _ in edges:
            if target == f"{PACKAGE}._sansio" or target.startswith(f"{PACKAGE}._sansio."):
                continue
            if target.split(".")[0] in allowed_roots:
                continue
            if not any(target == name or target.startswith(f"{name}.") for name in allowed):
                wrong.append(f"{module} imports {target}")
    assert not wrong, "_sansio/ must stay free of I/O and of the layers above it:\n" + "\n".join(
        wrong
    )


def test_sansio_allow_list_forbids_trio_and_friends() -> None:
    # The check above would let these through if they ever became stdlib names.
    for name in ("trio", "anyio", "coredis", PACKAGE):
        assert name not in sys.stdlib_module_names
        assert name not in SANSIO_THIRD_PARTY


def test_every_module_has_a_layer() -> None:
    for module in modules():
        layer_of(module)


def test_no_module_imports_a_higher_layer() -> None:
    upward = set()
    for module, edges in graph().items():
        for target, _ in edges:
            if target != PACKAGE and not target.startswith(f"{PACKAGE}."):
                continue
            if target == PACKAGE and module != PACKAGE:
                upward.add((layer_name(module), "__init__"))
                continue
            if layer_of(target) > layer_of(module):
                upward.add((layer_name(module), layer_name(target)))
    unexpected = upward - UPWARD_ALLOWED
    assert not unexpected, f"imports from a lower layer up to a higher one: {sorted(unexpected)}"
    gone = UPWARD_ALLOWED - upward
    assert not gone, f"these upward imports are gone: remove them from UPWARD_ALLOWED: {gone}"


def _cycles(edges: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: set[tuple[str, ...]] = set()

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.add(tuple(sorted(component)))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def _runtime_edges() -> dict[str, set[str]]:
    found = graph()
    edges: dict[str, set[str]] = {}
    for module, targets in found.items():
        edges[module] = {
            target
            for target, type_checking in targets
            # A submodule importing its own package's __init__ is how Python
            # loads it anyway: not an arrow of ours.
            if not type_checking and target in found and not module.startswith(f"{target}.")
        }
    return edges


def test_cycle_finder_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {("a", "b", "c")}
    assert _cycles({"a": {"b"}, "b": set()}) == set()


def test_no_import_cycle_at_run_time() -> None:
    """No cycle among wsnursery's modules (TYPE_CHECKING imports left out; imports
    inside functions counted)."""
    cycles = _cycles(_runtime_edges())
    assert not cycles, f"import cycles among wsnursery's modules: {sorted(cycles)}"


# -- the private wsproto names _sansio/deflate.py relies on ------------------------------


def _fresh_frame_protocol() -> object:
    from wsproto.frame_protocol import FrameProtocol

    return FrameProtocol(False, [])


def _fresh_deflate() -> object:
    from wsproto.extensions import PerMessageDeflate

    return PerMessageDeflate()


#: (where, attribute): each must exist in the installed wsproto. Keep this in
#: step with the list at the top of src/wsnursery/_sansio/deflate.py.
WSPROTO_PRIVATE_ATTRIBUTES = [
    ("wsproto.frame_protocol.FrameProtocol", "_process_close"),
    ("wsproto.frame_protocol.FrameProtocol", "_serialize_frame"),
    ("FrameProtocol(...)", "_frame_decoder"),
    ("FrameProtocol(...)._frame_decoder", "header"),
    ("FrameProtocol(...)._frame_decoder", "payload_consumed"),
    ("FrameProtocol(...)._frame_decoder", "masker"),
    ("wsproto.frame_protocol.FrameDecoder", "parse_header"),
    ("PerMessageDeflate()", "_inbound_compressed"),
    ("PerMessageDeflate()", "_inbound_is_compressible"),
    ("PerMessageDeflate()", "_decompressor"),
]


def _owner(where: str) -> object:
    from wsproto import frame_protocol

    if where == "FrameProtocol(...)":
        return _fresh_frame_protocol()
    if where == "FrameProtocol(...)._frame_decoder":
        return _fresh_frame_protocol()._frame_decoder  # type: ignore[attr-defined]
    if where == "PerMessageDeflate()":
        return _fresh_deflate()
    return getattr(frame_protocol, where.rpartition(".")[2])


@pytest.mark.parametrize(
    ("where", "attribute"),
    WSPROTO_PRIVATE_ATTRIBUTES,
    ids=[f"{w}.{a}" for w, a in WSPROTO_PRIVATE_ATTRIBUTES],
)
def test_the_private_wsproto_names_deflate_uses_exist(where: str, attribute: str) -> None:
    import wsproto

    assert hasattr(_owner(where), attribute), (
        f"wsproto {getattr(wsproto, '__version__', '?')} has no {where}.{attribute}, which "
        "src/wsnursery/_sansio/deflate.py relies on: adapt deflate.py before allowing this "
        "wsproto version in pyproject.toml"
    )


@pytest.mark.parametrize(
    "function", ["FrameDecoder.parse_header", "FrameProtocol._serialize_frame"]
)
def test_wsproto_looks_its_masker_up_as_a_global(function: str) -> None:
    """deflate.with_fast_masker relies on it to give our objects the C masker."""
    from wsproto import frame_protocol

    cls, _, name = function.partition(".")
    code = getattr(getattr(frame_protocol, cls), name).__code__
    assert "XorMaskerSimple" in code.co_names, (
        f"wsproto's {function} no longer looks up the global XorMaskerSimple: "
        "src/wsnursery/_sansio/deflate.py's with_fast_masker needs another way"
    )
    assert "XorMaskerSimple" in vars(frame_protocol)


def test_installed_wsproto_is_in_the_pinned_range() -> None:
    # The project's own dependency list, as installed from pyproject.toml (no
    # TOML parser needed: tomllib is not in Python 3.10).
    from importlib.metadata import requires, version

    from packaging.requirements import Requirement

    declared = requires("wsnursery") or []
    [pin] = [Requirement(line) for line in declared if Requirement(line).name == "wsproto"]
    assert pin.specifier, "pyproject.toml must bound wsproto: deflate.py uses its private names"
    assert any(spec.operator == "<" for spec in pin.specifier), "wsproto needs an upper bound"
    installed = version("wsproto")
    assert pin.specifier.contains(installed), f"wsproto {installed} is outside {pin}"


# -- the public face ------------------------------------------------------------------------


def _isort_key(name: str) -> tuple[int, str]:
    """ruff's RUF022 order: CONSTANTS, then CamelCase, then the rest, each alphabetical."""
    if name.isupper():
        return 0, name
    return (1 if name[:1].isupper() else 2), name


def test_all_lists_every_public_name_sorted() -> None:
    import __future__

    import types

    import wsnursery

    exported = {
        name
        for name, value in vars(wsnursery).items()
        if not name.startswith("_")
        and not isinstance(value, types.ModuleType)  # wsnursery.testing, once imported
        and not isinstance(value, __future__._Feature)  # from __future__ import annotations
    }
    assert len(wsnursery.__all__) == len(set(wsnursery.__all__)), "a name twice in __all__"
    assert set(wsnursery.__all__) == exported
    assert wsnursery.__all__ == sorted(wsnursery.__all__, key=_isort_key)
    namespace: dict[str, object] = {}
    exec("from wsnursery import *", namespace)
    assert set(namespace) - {"__builtins__"} == exported


def test_public_names_report_the_public_module() -> None:
    import inspect

    import wsnursery

    for name in wsnursery.__all__:
        value = getattr(wsnursery, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__ == "wsnursery", name

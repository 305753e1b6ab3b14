"""The package layout's import rule: data flows downhill, nothing imports upward, and the pure layers stay pure.

Layers, bottom up: ``wire`` and ``guard`` (side by side, neither imports the other), ``config``, then
``moderation`` / ``tenants`` / ``eval`` (side by side), ``server``, and ``cli`` / ``testing`` on top. Every
``import guardproxy...`` in the package (module level or inside a function) is checked.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "guardproxy"

#: top-level part of the package -> (layer, group); a module may import its own group and any lower layer.
LAYERS = {
    "wire": (0, "wire"), "guard": (0, "guard"), "config": (1, "config"),
    "moderation": (2, "moderation"), "tenants": (2, "tenants"), "eval": (2, "eval"),
    "server": (3, "server"), "cli": (4, "cli"), "testing": (4, "testing"), "__init__": (0, "root"),
}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[str]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.startswith("guardproxy")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("guardproxy"):
            out.append(node.module)
            if node.module == "guardproxy":
                out += [f"guardproxy.{a.name}" for a in node.names]
    return out


def _module(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    return ".".join(p for p in rel.parts if p != "__init__")


FILES = sorted(PKG.rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PKG)))
def test_nothing_imports_upward(path):
    me = _module(path)
    layer, group = LAYERS[_part(me)]
    bad = []
    for imp in _imports(path):
        if imp == "guardproxy":
            continue
        their_layer, their_group = LAYERS[_part(imp)]
        if their_group != group and their_layer >= layer:
            bad.append(imp)
    assert not bad, f"{me} (layer {layer}) imports {bad}"


def test_the_rule_sees_an_upward_import(tmp_path):
    fake = PKG / "wire" / "sse.py"
    src = fake.read_text() + "\nfrom guardproxy.server.app import create_app\n"
    (tmp_path / "sse.py").write_text(src)
    assert "guardproxy.server.app" in _imports(tmp_path / "sse.py")
    assert LAYERS[_part("guardproxy.server.app")][0] > LAYERS[_part("guardproxy.wire.sse")][0]


def test_wire_and_moderation_load_neither_torch_nor_aiohttp():
    code = ("import sys; import guardproxy.wire.sse, guardproxy.wire.chunks, guardproxy.wire.errors, "
            "guardproxy.moderation.response, guardproxy.guard.labels, guardproxy.guard.errors; "
            "print(sorted(m for m in ('torch', 'aiohttp', 'httpx') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

"""The layering rules of CONTRIBUTING.md, read from the import statements (ast, so imports inside
functions count too): the core never imports a plugin, only the CLI entry points import the
CLI, and plugins use only the public API listed in ``xbench.__all__`` (plus
``xbench.cli.options``, the builders of the shared flags for the commands plugins register,
docs/cli.md)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import xbench

ROOT = Path(__file__).resolve().parent.parent
CORE = ROOT / "xbench"
PLUGIN_DIRS = (ROOT / "plugins", ROOT / "tests" / "example_plugin")
#: the modules that start the CLI (commands.py adds the plugins' commands to its parser);
#: everything else in the core is usable without it
CLI_ENTRY_POINTS = {"xbench/__main__.py", "xbench/commands.py"}
#: the one core module besides ``xbench`` itself that plugins may import: the flag builders
PLUGIN_CLI_API = "xbench.cli.options"


def imports(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, imported names) of every import in ``path``; ``import a.b`` gives
    module ``a.b`` and no names, relative imports are resolved against the file's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                package = path.relative_to(ROOT).parent.parts
                package = package[:len(package) - node.level + 1]
                module = ".".join(("xbench_plugins",) + package[1:] if package[:1] == ("plugins",)
                                  else package) + (f".{module}" if module else "")
            found.append((node.lineno, module, [alias.name for alias in node.names]))
    return found


def python_files(*folders: Path) -> list[Path]:
    return sorted(p for folder in folders for p in folder.rglob("*.py"))


def offences_core_imports_plugin(files: list[Path]) -> list[str]:
    return [f"{path.relative_to(ROOT)}:{line} imports {module}"
            for path in files for line, module, _ in imports(path)
            if module == "xbench_plugins" or module.startswith("xbench_plugins.")]


def offences_imports_cli(files: list[Path]) -> list[str]:
    out = []
    for path in files:
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith("xbench/cli/") or relative in CLI_ENTRY_POINTS:
            continue
        out += [f"{relative}:{line} imports {module}" for line, module, _ in imports(path)
                if module == "xbench.cli" or module.startswith("xbench.cli.")]
    return out


def offences_private_api(files: list[Path]) -> list[str]:
    public = set(xbench.__all__)
    out = []
    for path in files:
        for line, module, names in imports(path):
            where = f"{path.relative_to(ROOT)}:{line}"
            if module == PLUGIN_CLI_API:
                continue
            if module.startswith("xbench."):
                out.append(f"{where} imports {module} (not public: use 'from xbench import ...')")
            elif module == "xbench":
                out += [f"{where} imports xbench.{name} (not in xbench.__all__)"
                        for name in names if name not in public]
    return out


def test_core_never_imports_a_plugin():
    assert offences_core_imports_plugin(python_files(CORE)) == []


def test_only_the_cli_imports_the_cli():
    """Views (report, leaderboard, plots) and the library never import a CLI module."""
    assert offences_imports_cli(python_files(CORE)) == []


def test_plugins_use_only_the_public_api():
    assert offences_private_api(python_files(*PLUGIN_DIRS)) == []


def test_every_public_name_resolves():
    for name in xbench.__all__:
        assert getattr(xbench, name) is not None, name


@pytest.mark.parametrize("source, check, expected", [
    ("from xbench_plugins.gradcam import x\n", offences_core_imports_plugin, 1),
    ("def f():\n    import xbench_plugins\n", offences_core_imports_plugin, 1),
    ("from xbench.cli.plot import x\n", offences_imports_cli, 1),
    ("from xbench.model import ClassifierHandle\n", offences_private_api, 1),
    ("from xbench import ClassifierHandle, _PUBLIC\n", offences_private_api, 1),
    ("import xbench.saliency\n", offences_private_api, 1),
    ("from xbench.cli.options import examples\n", offences_private_api, 0),
    ("from xbench.cli.console import message_console\n", offences_private_api, 1),
    ("from xbench.cli import options\n", offences_private_api, 1),
    ("import xbench\nfrom xbench import ClassifierHandle, hookimpl\n", offences_private_api, 0),
])
def test_the_rules_catch_what_they_forbid(tmp_path, monkeypatch, source, check, expected):
    """Each check finds a planted offence (and accepts a clean file), so an empty list above
    means the rule holds rather than that nothing was read."""
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    path = tmp_path / "xbench" / "view.py"
    path.parent.mkdir()
    path.write_text(source)
    assert len(check([path])) == expected

"""The documentation agrees with the code: docs/cli.md is the live --help, README names every option."""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

import pytest

from onnx_lowrank.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
GENERATOR = ROOT / "docs" / "generate_cli_md.py"


def _generator():
    spec = importlib.util.spec_from_file_location("generate_cli_md", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _long_options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted({s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"})


def test_cli_md_matches_the_live_parsers():
    generator = _generator()
    expected = generator.render()
    current = (ROOT / "docs" / "cli.md").read_text()
    assert current == expected, "docs/cli.md is out of date: run python docs/generate_cli_md.py"


def test_cli_md_covers_every_subcommand_and_option():
    generator = _generator()
    parser = build_parser()
    text = (ROOT / "docs" / "cli.md").read_text()
    commands = generator.subcommands(parser)
    assert {"optimize", "bench", "demo"} <= set(commands)
    for name, sub in commands.items():
        assert f"## onnx-lowrank {name}\n" in text
        for option in _long_options(sub):
            assert option in text, f"{name} {option} missing from docs/cli.md"


def test_render_does_not_depend_on_the_terminal(monkeypatch: pytest.MonkeyPatch):
    generator = _generator()
    monkeypatch.setenv("COLUMNS", "60")
    narrow = generator.render()
    monkeypatch.setenv("COLUMNS", "250")
    assert generator.render() == narrow
    import os

    assert os.environ["COLUMNS"] == "250"  # restored after rendering


def test_readme_names_every_optimize_option():
    readme = (ROOT / "README.md").read_text()
    optimize = _generator().subcommands(build_parser())["optimize"]
    missing = [o for o in _long_options(optimize) if not re.search(rf"(?<![\w-]){re.escape(o)}(?![\w-])", readme)]
    assert not missing, f"README.md does not mention these optimize options: {', '.join(missing)}"

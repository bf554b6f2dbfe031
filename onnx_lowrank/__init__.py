"""onnx-lowrank: low-rank factorization of ONNX models, and an onnxruntime harness that says what it cost.

>>> import onnx_lowrank
>>> model, report = onnx_lowrank.optimize("model.onnx", onnx_lowrank.LowRankConfig(ratio=0.5))  # doctest: +SKIP
>>> print(report.format_table())  # doctest: +SKIP

The public names are imported on first use (PEP 562), not when the package is: importing
``onnx_lowrank.core.linalg`` (numpy only) must not load onnx, the graph pass or onnxruntime just
because Python initializes the parent package first.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # annotations only, and what the lazy names are, for type checkers and IDEs
    from collections.abc import Sequence
    from types import ModuleType
    from typing import Any

    from onnx_lowrank.api import optimize
    from onnx_lowrank.config import LowRankConfig
    from onnx_lowrank.gs_api import optimize_graph
    from onnx_lowrank.ir_pass import LowRankPass
    from onnx_lowrank.model_io import ModelError, load_model, save_model
    from onnx_lowrank.report import LayerResult, Report

# A constant, not looked up lazily: the CLI's --version and the report metadata read it cheaply.
from onnx_lowrank.version import __version__  # noqa: E402

__all__ = [
    "LayerResult",
    "LowRankConfig",
    "ModelError",
    "Report",
    "__version__",
    "load_model",
    "optimize",
    "save_model",
]

# Every name __getattr__ resolves. LowRankPass (optional onnx-ir) and optimize_graph (onnx-graphsurgeon)
# are not in __all__, so that ``from onnx_lowrank import *`` never needs the optional packages.
_LAZY_NAMES = (
    "LayerResult",
    "LowRankConfig",
    "LowRankPass",
    "ModelError",
    "Report",
    "load_model",
    "optimize",
    "optimize_graph",
    "save_model",
)


def __getattr__(name: str) -> Any:
    # Plain import statements (not a table of module names) so that the import graph read from
    # the source (tests/test_layers.py) sees these edges.
    if name == "optimize":
        from onnx_lowrank.api import optimize as value
    elif name == "LowRankConfig":
        from onnx_lowrank.config import LowRankConfig as value
    elif name == "ModelError":
        from onnx_lowrank.model_io import ModelError as value
    elif name == "load_model":
        from onnx_lowrank.model_io import load_model as value
    elif name == "save_model":
        from onnx_lowrank.model_io import save_model as value
    elif name == "LayerResult":
        from onnx_lowrank.report import LayerResult as value
    elif name == "Report":
        from onnx_lowrank.report import Report as value
    elif name == "LowRankPass":
        from onnx_lowrank.ir_pass import LowRankPass as value
    elif name == "optimize_graph":
        from onnx_lowrank.gs_api import optimize_graph as value
    else:
        raise AttributeError(f"module 'onnx_lowrank' has no attribute {name!r}")
    globals()[name] = value  # later look-ups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES))


class _SourceCheckoutPasses(importlib.abc.MetaPathFinder):
    """Finds ``onnx_lowrank.passes`` in the repository's top-level ``passes/`` folder.

    Installed (normal or editable), setuptools' package-dir maps the top-level ``passes/`` folder
    to ``onnx_lowrank.passes``. Python started in the repository root without an install
    (``python -m onnx_lowrank``) imports ``onnx_lowrank`` from the folder instead, where
    ``passes`` is a sibling, not a subfolder: this finder loads it from there under the same name.

    It answers for that one name only; the submodules (``onnx_lowrank.passes.conv``, ...) are then
    found by the ordinary path finder through the package's ``submodule_search_locations``. It is
    appended to ``sys.meta_path``, so it answers only when no finder before it maps the name
    (an editable install's finder, or a normal install's ``onnx_lowrank/passes/``), and nothing is
    executed until the pass is actually imported.
    """

    _NAME = "onnx_lowrank.passes"

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != self._NAME:
            return None
        return importlib.util.spec_from_file_location(
            fullname, self.folder / "__init__.py", submodule_search_locations=[str(self.folder)]
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.folder)!r})"


def _register_source_checkout_passes() -> None:
    """Append a :class:`_SourceCheckoutPasses` for this checkout's ``passes/``, if it has one."""
    here = Path(__file__).resolve().parent
    folder = here.parent / "passes"
    # An installed package has onnx_lowrank/passes/ inside it; its parent folder is site-packages,
    # whose ``passes`` (if any) is somebody else's package.
    if (here / "passes").is_dir() or not (folder / "__init__.py").is_file():
        return
    # By name, not isinstance: importlib.reload makes a new class, and one finder is enough.
    if any(type(f).__qualname__ == _SourceCheckoutPasses.__qualname__ for f in sys.meta_path):
        return
    sys.meta_path.append(_SourceCheckoutPasses(folder))


_register_source_checkout_passes()

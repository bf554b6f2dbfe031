"""onnx-lowrank: low-rank factorization of ONNX models, and an onnxruntime harness that says what it cost.

>>> import onnx_lowrank
>>> model, report = onnx_lowrank.optimize("model.onnx", onnx_lowrank.LowRankConfig(ratio=0.5))  # doctest: +SKIP
>>> print(report.format_table())  # doctest: +SKIP
"""

def _source_checkout_passes() -> None:
    """Map ``onnx_lowrank.passes`` to ``passes/`` when running from a source checkout.

    Installed (normal or editable), setuptools' package-dir maps the top-level ``passes/`` folder
    to ``onnx_lowrank.passes``. Python started in the repository root (``python -m onnx_lowrank``)
    imports ``onnx_lowrank`` from the folder instead, where ``passes`` is a sibling: load it
    from there under the same name.
    """
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    source = here.parent / "passes" / "__init__.py"
    if (here / "passes").is_dir() or "onnx_lowrank.passes" in sys.modules or not source.is_file():
        return
    try:
        if importlib.util.find_spec("onnx_lowrank.passes") is not None:
            return  # an editable install's finder maps it already
    except ImportError:
        pass
    spec = importlib.util.spec_from_file_location(
        "onnx_lowrank.passes", source, submodule_search_locations=[str(source.parent)]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["onnx_lowrank.passes"] = module
    spec.loader.exec_module(module)


_source_checkout_passes()

from onnx_lowrank.api import optimize  # noqa: E402
from onnx_lowrank.config import LowRankConfig  # noqa: E402
from onnx_lowrank.model_io import ModelError, load_model, save_model  # noqa: E402
from onnx_lowrank.report import LayerResult, Report  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name: str):
    # LowRankPass needs the optional onnx-ir; import it only when asked for (not in __all__, so
    # that ``from onnx_lowrank import *`` works without onnx-ir).
    if name == "LowRankPass":
        from onnx_lowrank.ir_pass import LowRankPass

        return LowRankPass
    raise AttributeError(f"module 'onnx_lowrank' has no attribute {name!r}")

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

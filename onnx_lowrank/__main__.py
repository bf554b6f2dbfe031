"""``python -m onnx_lowrank`` is the ``onnx-lowrank`` command."""

import sys

from onnx_lowrank.cli import main

if __name__ == "__main__":  # importing the module (tools, doc builders) must not run the CLI
    sys.exit(main())

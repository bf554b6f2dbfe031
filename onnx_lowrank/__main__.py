"""``python -m onnx_lowrank`` is the ``onnx-lowrank`` command."""

import sys

from onnx_lowrank.cli import main

sys.exit(main())

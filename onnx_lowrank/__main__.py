"""``python -m onnx_lowrank`` is the ``onnx-lowrank`` command."""

import sys

from .cli import main

sys.exit(main())

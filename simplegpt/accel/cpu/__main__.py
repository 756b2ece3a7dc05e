"""python -m simplegpt.accel.cpu: which CPU kernels this machine uses, and why (lib.report())."""

import sys

from ...errors import SimpleGPTError
from .lib import report

try:
    print(report())
except SimpleGPTError as e:  # a SIMPLEGPT_CPU_KERNELS value that cannot be used here
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)

"""qcache's benchmarks and maintenance scripts (tools/README.md says which answers which question).

Each runs as ``python tools/NAME.py`` or ``python -m tools.NAME``; both import the shared module as ``common``,
which this package makes importable.
"""

import sys
from pathlib import Path

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

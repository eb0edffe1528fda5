"""Settings shared by every test directory.

The repository root goes first on ``sys.path`` so that ``import nbdquorum`` picks up the
working tree, whether or not the package has been installed into the venv.
"""

import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from __future__ import annotations

from nbdquorum.cli import main

raise SystemExit(main())

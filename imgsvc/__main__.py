"""`python -m imgsvc` is the `imgsvc` command."""

from __future__ import annotations

import sys

from imgsvc.cli import main

sys.exit(main())

"""`python -m serenbox` is the `serenbox` command."""

import sys

from serenbox.device.cli import main

sys.exit(main())

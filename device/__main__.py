"""`python -m serenbox.device` is `serenbox` too."""

import sys

from serenbox.device.cli import main

sys.exit(main())

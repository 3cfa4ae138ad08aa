"""``python -m jasper``: the same as the ``jasper`` command."""

import sys

from jasper.cli import main

sys.exit(main())

"""``python -m reliability``: see :mod:`reliability.campaign`."""

import sys

from reliability.campaign import main

sys.exit(main())

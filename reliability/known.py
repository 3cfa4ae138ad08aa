"""Case groups that fail the goal today, each with the issue item that fixes it.

The quick test (``tests/test_reliability_quick.py``) marks these groups ``xfail``: strict where
the failure is deterministic, so that the fix landing turns the test red until its entry is
removed here, and non-strict only where the case is a race whose failure shows in some runs.
The goal itself is never relaxed: an entry here is a finding waiting for its fix.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Known:
    """Why a (family, backend) group fails, and which issue item fixes it."""

    item: str
    reason: str
    racy: bool = False


#: (family, backend) -> why it fails now; keep in step with the last campaign run
#: (docs/reliability.md lists its findings)
KNOWN: dict[tuple[str, str], Known] = {}

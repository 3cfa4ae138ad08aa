"""jasper's on/off environment switches all read the same way."""

from __future__ import annotations

import pytest

from jasper.envflags import switched_off
from jasper.progress import progress_enabled


@pytest.mark.parametrize(("value", "off"), [("0", True), (" OFF ", True), ("False", True),
                                             ("no", True), ("1", False), ("", False),
                                             ("yes", False)])
def test_a_switch_reads_off_values_case_insensitively(monkeypatch: pytest.MonkeyPatch,
                                                       value: str, off: bool) -> None:
    monkeypatch.setenv("JASPER_SOME_SWITCH", value)
    assert switched_off("JASPER_SOME_SWITCH") is off
    monkeypatch.setenv("JASPER_PROGRESS", value)
    assert progress_enabled(True) is not off  # JASPER_PROGRESS=OFF used to be ignored


def test_an_unset_switch_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JASPER_SOME_SWITCH", raising=False)
    assert not switched_off("JASPER_SOME_SWITCH")

"""Fixtures for every test module; the helpers behind them live in harness.py and procs.py.

- ``anyio_backend``: anyio tests run on Trio and on asyncio;
- ``procs`` (from procs.py): real ``viamillipede`` processes in the test's directory, any still
  running at the end killed.

The report header says whether lab tests may skip (see ``harness.require_or_skip``).
"""

from __future__ import annotations

import pytest

from harness import REQUIRE_LAB, lab_required
from procs import procs_fixture  # noqa: F401  (registers the ``procs`` fixture)


def pytest_report_header() -> str:
    if lab_required():
        return f"lab tests: required ({REQUIRE_LAB}=1): a missing tool or privilege fails"
    return f"lab tests: skipped where a tool or privilege is missing (set {REQUIRE_LAB}=1 to fail)"


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Session tests run on both backends: the library must work in Trio and asyncio apps."""
    return str(request.param)

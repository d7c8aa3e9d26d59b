from __future__ import annotations

import pytest


@pytest.fixture(params=["trio", "asyncio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Session tests run on both backends: the library must work in Trio and asyncio apps."""
    return str(request.param)

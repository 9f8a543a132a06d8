"""shared test fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: the repository carries its vectors (tests/vectors); PYDSTACK_VECTORS points elsewhere
VECTORS = Path(os.environ.get("PYDSTACK_VECTORS", REPO / "tests" / "vectors"))


@pytest.fixture(scope="session")
def vectors() -> Path:
    """directory of the shared test vectors (real quotes, collateral, event logs)."""
    if not VECTORS.is_dir():
        pytest.fail(f"test vectors not found at {VECTORS}; set PYDSTACK_VECTORS")
    return VECTORS


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """every test under tests/integration carries the `integration` marker (they start real
    processes), so `-m "not integration"` (`scripts/test.sh --unit`) runs the unit tests alone."""
    integration = REPO / "tests" / "integration"
    for item in items:
        if integration in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)

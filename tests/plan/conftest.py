"""Fixtures of the planner tests."""

import pytest

from tests.plan import shapes


@pytest.fixture
def small_machine():
    """The CI machine's profile with 2 GiB available, no GPU and a slow disk: big targets page."""
    return shapes.small_machine()

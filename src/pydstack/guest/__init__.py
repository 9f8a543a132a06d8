"""pydstack.guest."""

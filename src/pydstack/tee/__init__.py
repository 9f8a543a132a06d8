"""pydstack.tee."""

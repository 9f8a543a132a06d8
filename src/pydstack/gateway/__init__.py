"""pydstack.gateway."""

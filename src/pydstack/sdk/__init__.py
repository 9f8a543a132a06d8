"""pydstack.sdk."""

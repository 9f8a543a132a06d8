"""pydstack.crypto."""

"""pydstack.attest."""

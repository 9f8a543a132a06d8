"""pydstack.verifier."""

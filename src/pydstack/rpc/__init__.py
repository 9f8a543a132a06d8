"""pydstack.rpc."""

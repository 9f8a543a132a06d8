"""pydstack.kms."""

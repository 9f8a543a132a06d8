"""pydstack.vmm."""

"""sample apps and a local image builder (no registry here: images are built from host files)."""

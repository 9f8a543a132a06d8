"""what crosses component boundaries: app-compose, sys-config, host-share names, docker compose
parsing, and the bounded JSON and YAML loaders every untrusted document goes through."""

"""pydstack: dstack in Python.

Deploys docker-compose apps into (simulated or real) Intel TDX confidential VMs, gives each app
an attested identity and keys only its measured code can obtain, and is wire-compatible with
upstream dstack.
"""

__version__ = "0.1.0"

#: the upstream dstack version whose wire formats this release speaks
UPSTREAM_VERSION = "0.6.0"

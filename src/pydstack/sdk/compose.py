"""app-compose helpers: a deterministic JSON form and its hash.

The guest hashes the exact bytes of app-compose.json; these helpers give a deployer one
canonical byte form to upload (keys sorted recursively, compact separators, UTF-8, NaN/Infinity
as null, top-level None values dropped).
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any


def sort_object(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: sort_object(obj[k]) for k in sorted(obj)}
    if isinstance(obj, list | tuple):
        return [sort_object(v) for v in obj]
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    return obj


def to_deterministic_json(obj: Any) -> str:
    return json.dumps(sort_object(obj), separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _normalize(compose: dict[str, Any]) -> dict[str, Any]:
    out = dict(compose)
    runner = out.get("runner")
    if runner == "bash":
        out.pop("docker_compose_file", None)
    elif runner in ("docker-compose", "nerdctl-compose"):
        out.pop("bash_script", None)
    if not out.get("pre_launch_script"):
        out.pop("pre_launch_script", None)
    return out


def get_compose_hash(app_compose: Any, normalize: bool = False) -> str:
    """sha256 hex of the deterministic JSON of an app-compose (a dict or a model)."""
    if hasattr(app_compose, "model_dump"):
        obj = app_compose.model_dump()
    elif hasattr(app_compose, "__dict__") and not isinstance(app_compose, dict):
        obj = dict(vars(app_compose))
    else:
        obj = dict(app_compose)
    obj = {k: v for k, v in obj.items() if v is not None}
    if normalize:
        obj = _normalize(obj)
    return hashlib.sha256(to_deterministic_json(obj).encode()).hexdigest()

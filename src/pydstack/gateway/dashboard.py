"""the admin server's HTML dashboard (``GET /``): this node, its WireGuard identity and every
registered instance with its address, last handshake, live connections and effective port
policy. Every value is HTML-escaped (ids, keys and policies come from CVMs); the page carries no
script and no token."""

from __future__ import annotations

import datetime as dt
from html import escape

from .service import GatewayContext

STYLE = (
    "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left;font-size:.9em}"
    "code{font-size:.9em}"
)


def _when(ts: float) -> str:
    if ts <= 0:
        return "never"
    return dt.datetime.fromtimestamp(ts, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def render_dashboard(ctx: GatewayContext) -> str:
    control = ctx.control
    node = ctx.node
    state = control.store.load()
    rows = []
    for rec in sorted(state.instances.values(), key=lambda r: r.ip):
        inst = ctx.table.get(rec.instance_id)
        policy, source = inst.policy() if inst is not None else (None, None)
        if policy is None:
            pol = "none (refused until known)"
        elif not policy.restrict_mode:
            pol = "open"
        else:
            pol = "only " + (", ".join(str(p) for p in sorted(policy.ports)) or "nothing")
        pol += f" [{source.value}]" if source is not None and policy is not None else ""
        cells = (
            rec.app_id,
            rec.instance_id,
            rec.ip,
            rec.public_key,
            _when(control.latest_handshake(rec.public_key)),
            str(ctx.table.connections(rec.instance_id)),
            pol,
        )
        rows.append("<tr>" + "".join(f"<td><code>{escape(c)}</code></td>" for c in cells) + "</tr>")
    head = "".join(
        f"<th>{h}</th>"
        for h in (
            "app id",
            "instance id",
            "ip",
            "wireguard key",
            "last handshake",
            "conns",
            "ports",
        )
    )
    status = state.status_of(node.node_id)
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>dstack-gateway</title>"
        f"<style>{STYLE}</style></head><body><h1>dstack-gateway</h1>"
        f"<p>node {node.node_id} ({escape(status)}), base domain "
        f"<code>{escape(ctx.base_domain or '-')}</code>, wireguard "
        f"<code>{escape(node.wg_ip)}</code> at <code>{escape(node.wg_endpoint)}</code>, key "
        f"<code>{escape(node.wg_public_key)}</code></p>"
        f"<p>{len(state.instances)} registered, {control.online()} online</p>"
        f"<table><tr>{head}</tr>{''.join(rows)}</table></body></html>"
    )

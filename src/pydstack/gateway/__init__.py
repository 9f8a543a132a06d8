"""pydstack.gateway: dstack-gateway.

The data plane (this package's relay and its sans-I/O cores) and what the control plane fills:

* :class:`~.routes.RouteTable`: instances (:class:`~.routes.Instance`: instance_id, app_id,
  WireGuard ip and public key, compose hash, reported and admin port policies), the WireGuard
  handshake map (``set_handshakes``, fed from ``wg show <if> latest-handshakes``), connection
  counters (``connections``), and ``on_policy_missing`` for the lazy policy fetch;
* :class:`~.certstore.CertStore`: one wildcard certificate per base domain (``set``/``remove``);
* :class:`~.config.ProxyConfig`: the ``[core.proxy]``/``[core.debug]`` keys of gateway.toml;
* :class:`~.workers.WorkerPool`: ``[core.proxy] workers`` relay processes fed from the table
  and the store (``publish`` after changes), with the ``gateway`` id's app-info and acme-info
  from the control plane's callables; :class:`~.proxy.ProxyServer` is the same relay in-process.
"""

"""certificates by ACME DNS-01 for the gateway's ZT-domains, and the CT monitor.

The gateway uses this package as a library (upstream's distributed certbot, §5 of the gateway
notes): it implements the two small interfaces here over its own state (a local file store
alone, etcd in a cluster) and calls :class:`~.certbot.Certbot`.

* :mod:`.model` — the stored records (certificate data, attestations, DNS credentials,
  ZT-domains, certbot settings, the ACME account) and their JSON;
* :mod:`.storage` — :class:`~.storage.CertStorage` over a key-value space with upstream's key
  layout, in memory or in a file;
* :mod:`.lock` — :class:`~.lock.DomainLock`, a cluster-wide lock with an expiry;
* :mod:`.dns01`, :mod:`.cloudflare`, :mod:`.rfc2136`, :mod:`.dnscheck` — DNS providers and the
  propagation check;
* :mod:`.acme_client` — the ACME account and the DNS-01 order flow (the ``acme`` library),
  CAA records;
* :mod:`.attest` — report data of issued keys and the attester the gateway passes in;
* :mod:`.certbot` — renewal under the lock, attestation history, account rotation, AcmeInfo;
* :mod:`.admin` — the Admin API's operations on credentials, ZT-domains and settings;
* :mod:`.ctlog`, :mod:`.acme_info`, :mod:`.ct_monitor` — ``dstack-ct-monitor``;
* :mod:`.cfmock`, :mod:`.devdns`, :mod:`.devctlog` — local stand-ins for tests and development
  (a Cloudflare API on top of a real bind9, bind9 and pebble runners, an RFC 6962 log).
"""

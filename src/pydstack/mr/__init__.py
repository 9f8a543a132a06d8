"""dstack-mr: what a TDX CVM's MRTD and RTMR0-2 must be for an OS image and a VM configuration.

* :mod:`.tdvf` — the TDVF metadata of the firmware: MRTD (single- and two-pass page adds), the
  TD HOB for a memory size, its compact witness, and the RTMR0 event log;
* :mod:`.kernel` — QEMU's setup-header patch of the kernel, its Authenticode SHA-384 (RTMR1) and
  the command line digest (RTMR2);
* :mod:`.machine` — the measured part of a VM configuration (`vm_config` keys);
* :mod:`.lite` — the `measurement.tdx.cbor` document (version 3) an image ships, and the
  no-image verification from it and the event log's ACPI digests;
* :mod:`.image` — an image directory (`metadata.json`, firmware, kernel, initrd, `sha256sum.txt`):
  its identity and measurements;
* :mod:`.store` — images by `os_image_hash`: a cache directory, downloads, measurement cache;
* :mod:`.verify` — the OS-image check the shared verification core calls;
* :mod:`.cli` — the `dstack-mr` command.
"""

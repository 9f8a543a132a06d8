"""the qemu backend: CVMs as QEMU processes booting guest images in upstream's layout.

:mod:`.backend` is what the VMM calls; :mod:`.cmdline` builds the QEMU command line (upstream's
order); :mod:`.qmp` talks to a running QEMU; :mod:`.config` parses `[cvm.qemu]`;
:mod:`.image_build` and :mod:`.initramfs` build guest images from Debian packages.
"""

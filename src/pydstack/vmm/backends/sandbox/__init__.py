"""the sandbox backend: CVMs as Linux namespaces on this host, with the simulated TDX.

:mod:`.backend` is what the VMM calls; :mod:`.launcher` is the per-CVM process
(`python -m pydstack.vmm.backends.sandbox.launcher`); :mod:`.network`, :mod:`.forward` and
:mod:`.cgroups` are the host pieces it sets up; :mod:`.config` parses `[cvm.sandbox]`.
"""

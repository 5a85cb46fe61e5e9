"""Hypervisor engines behind one async :class:`hv.driver.Driver` interface.

``sim`` is the deterministic embedded default; ``qemu`` runs real guests. An engine never imports
another; :mod:`hv.engines` picks one by name.
"""

"""High availability: the failure detector, fencing through ``controller.hardware``, and HA restarts.

It may use ``controller.services.vms`` (to restart a VM) and never ``controller.services.migration``.
"""

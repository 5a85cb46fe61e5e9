"""Live migration (``migrate``) and host evacuation (``evacuation``), both persistent operations.

It may use ``controller.services.vms``, ``controller.services.hosts`` and the layers below the services;
never ``controller.services.ha`` or ``controller.services.power``.
"""

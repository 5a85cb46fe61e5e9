"""The controller's use cases, one class each, handed the few collaborators they need.

Layers inside, from the top: ``power`` (may use ``migration``), then ``migration`` and ``ha``
(independent of each other; ``ha`` may use ``vms``), then ``vms`` and ``hosts``, then ``operations``
and ``cleanup``, then ``agent_rpc``. Services may import ``controller.scheduler``,
``controller.balancer``, ``controller.hardware``, ``controller.state``, ``controller.common`` and
``protocols``; never ``controller.api``, ``controller.intake`` or ``controller.daemon``.
"""

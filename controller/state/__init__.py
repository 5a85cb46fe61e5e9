"""The controller's state: the store, the event hub, the latest telemetry and inventories, the standby set,
and reconciliation as a function that returns what is left to do.

Nothing here runs a task or touches the bus. It may import ``controller.common`` and ``protocols``.
"""

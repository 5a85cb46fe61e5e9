"""The HTTP edge: the REST API, one router module per resource, and the one place where domain errors
become HTTP statuses (:mod:`controller.api.http`).

It may import ``controller.services``, ``controller.state``, ``controller.scheduler``,
``controller.security``, ``controller.common`` and ``protocols``; only ``controller.daemon`` imports it.
"""

"""Security adapters: API tokens and roles (``auth``), and the small certificate authority (``pki``).

It imports nothing else of the controller.
"""

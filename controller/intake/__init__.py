"""The bus edge into the controller: subscriptions, the per-host rate limit, decoding, and routing of
each message to the service that owns it.

It may import ``controller.services``, ``controller.state``, ``controller.common`` and ``protocols``;
nothing below it imports it.
"""

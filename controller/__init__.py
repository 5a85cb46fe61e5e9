"""The controller: state store, placement, operations, reconciliation, REST API and event stream.

It talks to hosts only through the bus and imports nothing of the agent or the engines.
"""

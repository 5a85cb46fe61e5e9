"""The wire contract of Fleetvisor: bus messages, the VM spec, topic names and the bus client.

This is the bottom layer. It imports nothing else of ours, and both the agent and the controller
build on it.
"""

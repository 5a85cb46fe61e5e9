"""Broker adapters: the embedded amqtt broker and the Mosquitto configuration with per-host ACLs.

It imports nothing else of the controller.
"""

"""What every controller layer shares: the domain errors and the guarded task set.

It imports nothing else of the controller.
"""

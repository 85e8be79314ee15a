"""Serving: the Ray Serve application (edge: ingress, app, local stack, CLI) and the engine behind it
(engine_core, scheduler, caches, and the engine deployment). Import submodules directly; this package
imports nothing heavy so that `lloco` commands stay fast.
"""

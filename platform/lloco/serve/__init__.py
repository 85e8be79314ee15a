"""Serving: the Ray Serve application (edge: ingress, app, local stack, CLI) and the engine behind it
(engine_core, scheduler, caches, and the engine deployment). Import submodules directly; this package
imports nothing heavy so that `lloco` commands stay fast.
"""

DRAIN_POLL_S = 0.2
"""How often a stopping replica checks for calls still in flight (Serve's ``graceful_shutdown_wait_loop_s``,
2 s by default). The drain still waits for every call, up to Serve's graceful shutdown timeout; a shorter poll
only lets an idle replica stop at once instead of sleeping a whole loop first (`lloco up` stopping, the
tests' stacks, a rolling update)."""

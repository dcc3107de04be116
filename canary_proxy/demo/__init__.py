"""``canary-proxy demo``: the run (apps, proxy, traffic, controller), its model and its views."""

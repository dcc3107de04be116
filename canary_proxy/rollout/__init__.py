"""The rollout controller: raise the canary's weight step by step, analysing it against stable.

Pure core: ``plan`` (the steps), ``analysis`` (one verdict per window), ``state`` (what is
recorded) and ``controller.decide`` (one tick = one decision). Thin shell: ``sources`` (where
metrics come from), ``store`` (where weight and state live) and ``controller.run``.
"""

"""The rollout controller: raise the canary's weight step by step, analysing it against stable.

Pure core: ``plan`` (the steps), ``analysis`` (one verdict per window), ``state`` (what is
recorded) and ``decide`` (one tick = one decision). Thin shell: ``sources`` (where metrics
come from), ``store`` (where weight and state live), ``controller`` (the loop that runs the
ticks) and ``report`` (a rollout's status, for ``status`` and the dashboard).
"""

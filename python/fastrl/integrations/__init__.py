"""Drop-in replacements for the math of existing RL trainers, built on fastrl's compiled ops.

Each submodule mirrors one trainer's function names, signatures and outputs (pinned release) and is
imported on its own, so importing ``fastrl.integrations`` never imports verl or TRL:

* :mod:`fastrl.integrations.verl` -- verl 0.9.1 ``core_algos`` outcome-advantage estimators, and
  ``install()`` / ``uninstall()`` for verl's advantage-estimator registry.
* :mod:`fastrl.integrations.trl` -- TRL 1.16.0 ``GRPOTrainer`` reward combination and advantages.
"""

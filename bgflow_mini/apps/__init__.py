"""Hydra applications (the only part of the package that imports Hydra).

``bgflow-train``, ``bgflow-sample``, ``bgflow-free-energy`` and ``bgflow-md`` run the
``main`` of :mod:`.train`, :mod:`.sample`, :mod:`.free_energy` and :mod:`.run_md`;
``scripts/*.py`` are shims that call the same functions.
"""

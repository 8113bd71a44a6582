"""Hydra applications (the only part of the package that imports Hydra).

``bgflow-train``, ``bgflow-sample``, ``bgflow-free-energy``, ``bgflow-md`` and
``bgflow-system`` run the ``main`` of :mod:`.train`, :mod:`.sample`, :mod:`.free_energy`,
:mod:`.run_md` and :mod:`.build_system`; ``scripts/*.py`` are shims that call the same
functions.
"""

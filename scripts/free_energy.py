"""Shim: `python scripts/free_energy.py [overrides]` is
`bgflow-free-energy` (:mod:`bgflow_mini.apps.free_energy`)."""

from bgflow_mini.apps.free_energy import main

if __name__ == "__main__":
    main()

"""Shim: `python scripts/run_md.py [overrides]` is `bgflow-md` (:mod:`bgflow_mini.apps.run_md`)."""

from bgflow_mini.apps.run_md import main

if __name__ == "__main__":
    main()

"""Shim: `python scripts/sample.py [overrides]` is
`bgflow-sample` (:mod:`bgflow_mini.apps.sample`)."""

from bgflow_mini.apps.sample import main

if __name__ == "__main__":
    main()

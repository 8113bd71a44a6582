"""Shim: `python scripts/train.py [overrides]` is `bgflow-train` (:mod:`bgflow_mini.apps.train`)."""

from bgflow_mini.apps.train import main

if __name__ == "__main__":
    main()

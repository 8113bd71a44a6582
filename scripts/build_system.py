"""Shim: `python scripts/build_system.py [overrides]` is `bgflow-system` (apps.build_system)."""

from bgflow_mini.apps.build_system import main

if __name__ == "__main__":
    main()

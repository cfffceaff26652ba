import sys

from tradeoff.cli import main

if __name__ == "__main__":  # not when a spawned process (the dashboard's planner) imports this as its parent's main
    sys.exit(main())

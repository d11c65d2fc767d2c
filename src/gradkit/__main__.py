import sys

from gradkit.cli import main

if __name__ == "__main__":  # compare starts its runs with "spawn", which re-imports this module
    sys.exit(main())

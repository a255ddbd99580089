"""`python -m training.report`: the `lorasa-report` CLI."""
import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())

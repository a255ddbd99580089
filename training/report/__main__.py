"""`python -m training.report`: the `lorasa-report` CLI."""
from . import main

if __name__ == "__main__":
    main()

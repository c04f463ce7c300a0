"""`python -m omnifuse_cli` is the same as the `omnifuse` console script."""

from omnifuse_cli.cli.app import main

if __name__ == "__main__":
    main()

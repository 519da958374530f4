"""``python -m nerv_cluster``: the ``nerv`` command line."""

from nerv_cluster.cli import main

if __name__ == "__main__":
    main()

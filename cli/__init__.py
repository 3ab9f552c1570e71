"""The ``dispatch`` command line. Prefect is imported only by the commands that run flows."""

"""Starts the executor: ``python -m services.executor``."""

from services.executor.main import main

main()

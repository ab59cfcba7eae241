"""Starts the persister: ``python -m services.persister``."""

from services.persister.main import main

main()

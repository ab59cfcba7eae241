"""Starts the policy service: ``python -m services.policy``."""

from services.policy.main import main

main()

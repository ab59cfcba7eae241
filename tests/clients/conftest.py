"""Client-library tests against the five services: the e2e stack fixture, shared."""

from tests.e2e.conftest import pipeline  # noqa: F401  (the five services, real NATS/Postgres)

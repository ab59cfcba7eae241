"""Persister settings (env: PERSISTER_* or BATON_*)."""

from __future__ import annotations

from shared.config import BaseSettings, Secret, load


class Settings(BaseSettings, kw_only=True, frozen=True):
    pool_size: int = 10
    # Retention (docs/operations.md): the policy file's retention_days per project, and where
    # archives go; without an archive URL (or without any retention_days) there is no sweep.
    policy_file: str = ""  # BATON_POLICY_FILE
    archive_url: str = ""  # file:///dir or s3://bucket/prefix
    archive_s3_endpoint: str = ""  # e.g. https://s3.eu-west-1.amazonaws.com, http://minio:9000
    archive_s3_region: str = "us-east-1"
    archive_s3_access_key_id: str = ""
    archive_s3_secret_access_key: Secret = Secret("")
    retention_period_s: float = 3600.0  # one sweep per period across all replicas
    retention_batch: int = 100  # conversations per batch (a log line each)
    retention_max_batches: int = 50  # per sweep; what is left is the backlog (alerted on)
    retention_pause_s: float = 0.0  # between conversations, to spare a busy database


def from_env() -> Settings:
    return load(Settings, "PERSISTER")

-- A model call cut by its executor's death is billed by estimate (shared/estimate.py): input
-- from its message_start, output from the deltas it had streamed; such rows are flagged, so
-- reports can tell what the provider's own count said from what baton reckoned.
ALTER TABLE usage ADD COLUMN estimated boolean NOT NULL DEFAULT false;

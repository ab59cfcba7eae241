-- Verdict events arrive in any order: remember which (status rank, attempt) set the verdict,
-- so an older verdict never overwrites a newer one.
ALTER TABLE runs
    ADD COLUMN verdict_rank int NOT NULL DEFAULT 0,
    ADD COLUMN verdict_attempt int NOT NULL DEFAULT 0;

-- The verdict record of a run: the limits it was checked against (with what was used of them at
-- that moment) and what policy reserved for it; actual usage is the sum of its usage rows.
ALTER TABLE runs
    ADD COLUMN limits jsonb,
    ADD COLUMN reserved_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN reserved_cost_usd numeric(18, 8) NOT NULL DEFAULT 0;

-- Project API keys (issue 17): server-to-server callers send X-API-Key and X-Acting-User.
-- Only the key's SHA-256 is stored (the key itself is printed once by `baton apikey create`);
-- the persister writes these rows from the commands the CLI publishes (I5), the gateway reads.
CREATE TABLE api_keys (
    id uuid PRIMARY KEY,
    project_id text NOT NULL,
    name text NOT NULL DEFAULT '',
    key_hash text NOT NULL UNIQUE,
    prefix text NOT NULL,  -- the key's first characters, to tell keys apart in a listing
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);

CREATE INDEX api_keys_project ON api_keys (project_id, created_at);

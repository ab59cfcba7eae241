-- baton's schema: the persister is its only writer; unique keys are the dedup that never expires.

CREATE TABLE conversations (
    id          uuid PRIMARY KEY,
    project_id  text NOT NULL,
    user_id     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX conversations_owner ON conversations (project_id, user_id);

CREATE TABLE messages (
    id               uuid PRIMARY KEY,
    conversation_id  uuid NOT NULL REFERENCES conversations (id),
    project_id       text NOT NULL,
    user_id          text NOT NULL,
    role             text NOT NULL CHECK (role IN ('user', 'assistant')),
    kind             text NOT NULL DEFAULT 'message'
                     CHECK (kind IN ('message', 'answer', 'refusal', 'clarify', 'failure')),
    content          text NOT NULL,
    content_hash     text NOT NULL DEFAULT '',
    idempotency_key  text,
    run_id           text,
    reply_to         uuid,
    created_at       timestamptz NOT NULL,
    persisted_at     timestamptz NOT NULL DEFAULT now(),
    seq              bigserial NOT NULL
);
CREATE INDEX messages_conversation ON messages (conversation_id, created_at, seq);
-- One final reply per run: a second answer for the same run can never be stored (I3).
CREATE UNIQUE INDEX messages_one_reply_per_run ON messages (run_id) WHERE role = 'assistant';

CREATE TABLE runs (
    run_id            text PRIMARY KEY,
    message_id        uuid NOT NULL UNIQUE,
    conversation_id   uuid NOT NULL,
    project_id        text NOT NULL,
    user_id           text NOT NULL,
    status            text NOT NULL,
    status_rank       int NOT NULL,
    verdict           text NOT NULL DEFAULT '',
    reason            text NOT NULL DEFAULT '',
    model             text NOT NULL DEFAULT '',
    executor          text NOT NULL DEFAULT '',
    attempts          int NOT NULL DEFAULT 0,
    estimated_tokens  int NOT NULL DEFAULT 0,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX runs_conversation ON runs (conversation_id, created_at);

-- One row per model call actually made (I4): a redelivered task is another call, another row.
CREATE TABLE usage (
    call_id             text PRIMARY KEY,
    task_id             text NOT NULL,
    run_id              text NOT NULL,
    attempt             int NOT NULL,
    project_id          text NOT NULL,
    model               text NOT NULL,
    outcome             text NOT NULL,
    input_tokens        bigint NOT NULL,
    output_tokens       bigint NOT NULL,
    cache_read_tokens   bigint NOT NULL,
    cache_write_tokens  bigint NOT NULL,
    cost_usd            numeric(18, 8) NOT NULL,
    created_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_run ON usage (run_id);

CREATE TABLE project_usage (
    project_id          text PRIMARY KEY,
    input_tokens        bigint NOT NULL DEFAULT 0,
    output_tokens       bigint NOT NULL DEFAULT 0,
    cache_read_tokens   bigint NOT NULL DEFAULT 0,
    cache_write_tokens  bigint NOT NULL DEFAULT 0,
    cost_usd            numeric(18, 8) NOT NULL DEFAULT 0,
    runs                bigint NOT NULL DEFAULT 0,
    updated_at          timestamptz NOT NULL DEFAULT now()
);

-- One outcome per run and round (issue 13): an answer and a tool turn of the same round,
-- written at the same instant by two model calls of the round (a redelivered task), each
-- claim the round here first. A unique index waits for a concurrent claim to commit and then
-- sees it, whatever the statement's snapshot: the second claimant learns the first one's kind
-- and stores nothing (the persister's outcome `superseded`). Deleted with the conversation.
CREATE TABLE round_claims (
    run_id           text NOT NULL,
    round            int NOT NULL,
    kind             text NOT NULL CHECK (kind IN ('answer', 'turn')),
    conversation_id  uuid NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, round)
);
CREATE INDEX round_claims_conversation ON round_claims (conversation_id);

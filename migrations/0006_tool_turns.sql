-- Tool use (issue 15): a run's tool exchanges, so the history sent to the model is real
-- Anthropic content blocks. The run's final answer stays one row in messages, as before.
-- The model's tool_use turn of each round; the first stored for (run, round) wins, so a
-- redelivered task's second model call never changes the calls policy decides on.
CREATE TABLE tool_turns (
    run_id           text NOT NULL,
    round            int NOT NULL,
    call_id          text NOT NULL,   -- the model call that wrote it (its usage row)
    conversation_id  uuid NOT NULL,
    reply_to         uuid NOT NULL,   -- the run's user message
    content          jsonb NOT NULL,  -- the assistant turn's content blocks (text, tool_use)
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, round)
);
CREATE INDEX tool_turns_reply_to ON tool_turns (reply_to);

-- One result per tool call (the run and the model's tool_use id): the first stored wins.
CREATE TABLE tool_results (
    tool_use_id   text NOT NULL,
    run_id        text NOT NULL,
    round         int NOT NULL,
    name          text NOT NULL,
    outcome       text NOT NULL,
    is_error      boolean NOT NULL,
    content       text NOT NULL,
    input_digest  text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, tool_use_id)
);
CREATE INDEX tool_results_run ON tool_results (run_id, round);

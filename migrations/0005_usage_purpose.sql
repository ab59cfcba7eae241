-- What each model call was for: 'classification' (the agent deciding what a message needs) or
-- 'answer' (an executor attempt); every row written before this column existed was an answer.
ALTER TABLE usage ADD COLUMN purpose text NOT NULL DEFAULT 'answer';

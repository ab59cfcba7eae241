-- A user message's place in its conversation (1, 2, 3, …), assigned by the persister under the
-- conversation's row lock: policy runs a conversation's messages strictly in this order (I6).
ALTER TABLE messages ADD COLUMN position int;
CREATE UNIQUE INDEX messages_position ON messages (conversation_id, position) WHERE role = 'user';

-- V2: conversations with the career assistant and their messages.

CREATE TABLE conversations (
    id          bigserial PRIMARY KEY,
    title       text NOT NULL DEFAULT 'New conversation' CHECK (length(title) BETWEEN 1 AND 300),
    topic       text CHECK (topic IN ('career_planning', 'interview_prep', 'resume', 'skills', 'general')),
    status      text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'archived')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX conversations_updated_at_idx ON conversations (updated_at DESC, id DESC);

CREATE TABLE messages (
    id               bigserial PRIMARY KEY,
    conversation_id  bigint NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    author           text NOT NULL CHECK (author IN ('user', 'assistant', 'system')),
    content          text NOT NULL CHECK (length(content) BETWEEN 1 AND 100000),
    metadata         jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX messages_conversation_idx ON messages (conversation_id, created_at, id);

-- V3: the profile summary (long form) and the quick summary (one paragraph),
-- each with its revision history.

CREATE TABLE summaries (
    kind        text PRIMARY KEY CHECK (kind IN ('quick', 'profile')),
    headline    text CHECK (length(headline) <= 300),
    content     text NOT NULL CHECK (length(content) <= 50000),
    details     jsonb NOT NULL DEFAULT '{}'::jsonb,
    revision    integer NOT NULL DEFAULT 1 CHECK (revision >= 1),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE summary_revisions (
    id          bigserial PRIMARY KEY,
    kind        text NOT NULL REFERENCES summaries (kind) ON DELETE CASCADE,
    revision    integer NOT NULL CHECK (revision >= 1),
    headline    text,
    content     text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (kind, revision)
);

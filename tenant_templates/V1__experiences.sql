-- V1: work and education experiences, the core of a career profile.
-- Names are unqualified: the tenant schema is the search_path when this runs.

CREATE TABLE experiences (
    id               bigserial PRIMARY KEY,
    kind             text NOT NULL DEFAULT 'work'
                     CHECK (kind IN ('work', 'education', 'volunteer', 'project', 'certification')),
    title            text NOT NULL CHECK (length(title) BETWEEN 1 AND 300),
    organization     text CHECK (length(organization) <= 300),
    employment_type  text CHECK (employment_type IN
                     ('full_time', 'part_time', 'contract', 'freelance', 'internship', 'apprenticeship', 'self_employed')),
    location         text CHECK (length(location) <= 300),
    is_remote        boolean NOT NULL DEFAULT false,
    industry_code    text,            -- reference.industries.code, by value
    started_on       date NOT NULL,
    ended_on         date,
    description      text CHECK (length(description) <= 20000),
    details          jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(details) = 'object'),
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CHECK (ended_on IS NULL OR ended_on >= started_on)
);
CREATE INDEX experiences_started_on_idx ON experiences (started_on DESC, id DESC);

CREATE TABLE experience_highlights (
    id             bigserial PRIMARY KEY,
    experience_id  bigint NOT NULL REFERENCES experiences (id) ON DELETE CASCADE,
    position       integer NOT NULL DEFAULT 0 CHECK (position >= 0),
    body           text NOT NULL CHECK (length(body) BETWEEN 1 AND 2000),
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX experience_highlights_experience_idx ON experience_highlights (experience_id, position);

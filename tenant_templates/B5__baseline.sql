-- B5: what V1..V5 build, in one go, for schemas made from nothing (a
-- baseline: tenancy::templates). The same statements in the same order,
-- except that V5's generated column `search_doc` is created with its table:
-- adding it later rewrites the table, and PostgreSQL 15 then reads every
-- index definition in the database (43 ms at 10,000 tenants, 8 ms on an
-- empty one). Tenantry checks at start that this builds exactly what
-- V1..V5 build (tenancy::baseline) and records V1..V5 in the history.
-- When a version changes what V1..V5 make, this file stays as it is: new
-- schemas take it and then the versions after V5.

-- from V1
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
    CHECK (ended_on IS NULL OR ended_on >= started_on),
    -- V5: the search document, made with its table (no rewrite).
    search_doc tsvector GENERATED ALWAYS AS (
    setweight(to_tsvector('english', title), 'A')
    || setweight(to_tsvector('english', coalesce(organization, '')), 'B')
    || setweight(to_tsvector('english', coalesce(details ->> 'skills', '')), 'B')
    || setweight(to_tsvector('english', coalesce(description, '')), 'C')
) STORED
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

-- from V2
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

-- from V3
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

-- from V4
-- V4: skills and how they progress, career milestones and achievements.

CREATE TABLE skills (
    id                bigserial PRIMARY KEY,
    name              text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    catalog_skill_id  integer,        -- reference.skills.id, by value
    category          text CHECK (length(category) <= 200),
    level             smallint NOT NULL DEFAULT 1 CHECK (level BETWEEN 1 AND 5),
    years_experience  numeric(4,1) CHECK (years_experience >= 0 AND years_experience <= 80),
    last_used_on      date,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX skills_name_key ON skills (lower(name));

CREATE TABLE skill_progress (
    id           bigserial PRIMARY KEY,
    skill_id     bigint NOT NULL REFERENCES skills (id) ON DELETE CASCADE,
    level        smallint NOT NULL CHECK (level BETWEEN 1 AND 5),
    note         text CHECK (length(note) <= 2000),
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX skill_progress_skill_idx ON skill_progress (skill_id, recorded_at);

CREATE TABLE career_milestones (
    id             bigserial PRIMARY KEY,
    title          text NOT NULL CHECK (length(title) BETWEEN 1 AND 300),
    description    text CHECK (length(description) <= 5000),
    experience_id  bigint REFERENCES experiences (id) ON DELETE SET NULL,
    achieved_on    date NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX career_milestones_achieved_on_idx ON career_milestones (achieved_on DESC);

CREATE TABLE achievements (
    id             bigserial PRIMARY KEY,
    title          text NOT NULL CHECK (length(title) BETWEEN 1 AND 300),
    description    text CHECK (length(description) <= 5000),
    impact         jsonb NOT NULL DEFAULT '{}'::jsonb,
    experience_id  bigint REFERENCES experiences (id) ON DELETE SET NULL,
    skill_id       bigint REFERENCES skills (id) ON DELETE SET NULL,
    achieved_on    date,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX achievements_experience_idx ON achievements (experience_id);
CREATE INDEX achievements_skill_idx ON achievements (skill_id);

-- from V5 (its column is in experiences above)

CREATE INDEX experiences_search_doc_idx ON experiences USING gin (search_doc);

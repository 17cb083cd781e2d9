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

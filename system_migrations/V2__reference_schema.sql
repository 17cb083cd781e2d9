-- Shared, read-only reference tables. Tenant roles read them through the
-- tenants group role (granted by the bootstrap); nobody but the service writes.

CREATE TABLE reference.skill_categories (
    id           serial PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    kind         text NOT NULL CHECK (kind IN ('technical', 'tool', 'domain', 'soft', 'language')),
    description  text NOT NULL
);

CREATE TABLE reference.skills (
    id           serial PRIMARY KEY,
    name         text NOT NULL,
    category_id  integer NOT NULL REFERENCES reference.skill_categories (id),
    UNIQUE (name, category_id)
);
CREATE INDEX skills_lower_name_idx ON reference.skills (lower(name) text_pattern_ops);

-- North American Industry Classification System (NAICS 2022): sectors and subsectors.
CREATE TABLE reference.industries (
    code            text PRIMARY KEY CHECK (code ~ '^[0-9]{2}(-[0-9]{2})?$|^[0-9]{3}$'),
    name            text NOT NULL,
    level           text NOT NULL CHECK (level IN ('sector', 'subsector')),
    parent_code     text REFERENCES reference.industries (code),
    classification  text NOT NULL DEFAULT 'NAICS 2022',
    CHECK ((level = 'sector') = (parent_code IS NULL))
);

CREATE TABLE reference.career_paths (
    id             serial PRIMARY KEY,
    name           text NOT NULL UNIQUE,
    description    text NOT NULL,
    industry_code  text REFERENCES reference.industries (code),
    progression    text[] NOT NULL CHECK (cardinality(progression) >= 2)
);

CREATE TABLE reference.role_templates (
    id              serial PRIMARY KEY,
    title           text NOT NULL UNIQUE,
    career_path_id  integer NOT NULL REFERENCES reference.career_paths (id),
    seniority       text NOT NULL CHECK (seniority IN ('entry', 'mid', 'senior', 'lead', 'executive')),
    summary         text NOT NULL,
    key_skills      text[] NOT NULL
);

CREATE TABLE reference.competencies (
    id           serial PRIMARY KEY,
    name         text NOT NULL UNIQUE,
    category     text NOT NULL CHECK (category IN ('core', 'leadership', 'technical', 'interpersonal')),
    description  text NOT NULL,
    indicators   text[] NOT NULL
);

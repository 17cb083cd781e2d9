-- V5: the search document of an experience, kept with the row and indexed,
-- so that a search reads the index instead of parsing every description.
-- The weights are the search's: title A, organization and skills B,
-- description C.

ALTER TABLE experiences ADD COLUMN search_doc tsvector GENERATED ALWAYS AS (
    setweight(to_tsvector('english', title), 'A')
    || setweight(to_tsvector('english', coalesce(organization, '')), 'B')
    || setweight(to_tsvector('english', coalesce(details ->> 'skills', '')), 'B')
    || setweight(to_tsvector('english', coalesce(description, '')), 'C')
) STORED;

CREATE INDEX experiences_search_doc_idx ON experiences USING gin (search_doc);

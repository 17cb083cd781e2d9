-- A session is a refresh-token family: the user agent it was started from
-- (carried on every token of the family) lets the user tell them apart.
ALTER TABLE tenantry.refresh_tokens
    ADD COLUMN user_agent text CHECK (length(user_agent) <= 512);

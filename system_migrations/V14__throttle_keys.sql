-- Failed sign-ins are counted under a keyed hash of the name as presented
-- (`n_` + 24 hex digits, the audit log's pseudonym of a name), so a name or
-- email typed at a login is never stored. Rows keyed by the name in clear
-- are dropped: they count for 15 minutes and lock for at most 15.
DELETE FROM tenantry.login_throttle;
COMMENT ON COLUMN tenantry.login_throttle.username IS
    'keyed hash of the name as presented (auth::throttle_key), never the name itself';

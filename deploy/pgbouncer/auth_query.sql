-- PgBouncer's auth_query lookup (the alternative to copying the application role's SCRAM
-- secret into auth_file; deploy/pgbouncer/pgbouncer.ini explains both).
--
-- Run as a superuser IN THE APPLICATION'S DATABASE (auth_query runs inside the database the
-- client asked for):
--     psql -h PRIMARY -U postgres -d koinonia -f deploy/pgbouncer/auth_query.sql
-- then give pgbouncer_auth a password (`\password pgbouncer_auth` in psql), copy its secret
-- into PgBouncer's auth_file like the application role's, allow it in pg_hba.conf from the
-- PgBouncer host (scram-sha-256), and in pgbouncer.ini set `auth_user=pgbouncer_auth` on the
-- [databases] line and uncomment auth_query.
--
-- The function is SECURITY DEFINER (it reads pg_authid, which only superusers may) and
-- answers for login roles that are not superusers: a superuser's secret never leaves the
-- server through PgBouncer, and pgbouncer_auth can do nothing else.

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'pgbouncer_auth') THEN
        CREATE ROLE pgbouncer_auth LOGIN;
    END IF;
END
$$;

CREATE SCHEMA IF NOT EXISTS pgbouncer;
REVOKE ALL ON SCHEMA pgbouncer FROM PUBLIC;
GRANT USAGE ON SCHEMA pgbouncer TO pgbouncer_auth;

CREATE OR REPLACE FUNCTION pgbouncer.get_auth(p_usename text)
RETURNS TABLE (usename name, passwd text)
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT rolname,
           CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END
    FROM pg_authid
    WHERE rolname = p_usename AND rolcanlogin AND NOT rolsuper
$$;

REVOKE ALL ON FUNCTION pgbouncer.get_auth(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION pgbouncer.get_auth(text) TO pgbouncer_auth;

-- A pack's readings (a JSON array of some forty readings, 2-4 KB) are compressed by
-- TOAST when the row passes 2 KB; with the default pglz that compression was 5 % of the
-- server's time in a flood. LZ4 compresses such text several times faster at a similar
-- ratio. New packs only (existing ones stay as stored; both read back the same). A server
-- built without LZ4 (or older than PostgreSQL 14) keeps the default: the MES works the
-- same either way, so this must not stop a start-up.
DO $$
BEGIN
    EXECUTE 'ALTER TABLE telemetry_packs ALTER COLUMN readings SET COMPRESSION lz4';
EXCEPTION WHEN OTHERS THEN
    RAISE NOTICE 'telemetry_packs.readings keeps the default compression: %', SQLERRM;
END $$;

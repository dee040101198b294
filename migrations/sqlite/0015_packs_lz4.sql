-- PostgreSQL's migration of this number compresses new packs with LZ4 instead of pglz.
-- SQLite stores rows uncompressed: nothing to change (the numbering stays the same on both).
SELECT 1;

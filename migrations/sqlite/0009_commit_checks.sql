-- Never holds a row. The writer's commit inserts `false` here only when its telemetry
-- insert stored fewer rows than it was given (a reading already stored): the CHECK then
-- fails the statement, and with it the commit, which is redone telling rows apart
-- (src/db/writer.rs, `is_short_insert`). This lets the count be checked inside the same
-- query as the rest of the commit, with no trip back to the writer in between.
CREATE TABLE commit_checks (
    ok BOOLEAN NOT NULL,
    CONSTRAINT telemetry_rows_all_new CHECK (ok)
);

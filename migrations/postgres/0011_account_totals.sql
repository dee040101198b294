-- Running debit and credit totals per account, kept by the database itself: every journal
-- insert, whichever code path runs it, adds its lines to their accounts in the same
-- transaction. The trial balance reads these instead of summing the whole journal (a 30-min
-- surge soak wrote 6.5M lines; summing them took 12.7 s). The journal is append-only.
ALTER TABLE accounts ADD COLUMN debit_total BIGINT NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN credit_total BIGINT NOT NULL DEFAULT 0;

UPDATE accounts SET
    debit_total = COALESCE((SELECT SUM(amount) FROM journal WHERE journal.debit = accounts.code), 0),
    credit_total = COALESCE((SELECT SUM(amount) FROM journal WHERE journal.credit = accounts.code), 0);

-- Once per statement over its new lines (a commit inserts many in one statement). The
-- accounts are locked in code order first, so two transactions posting to the same
-- accounts wait for each other instead of deadlocking.
CREATE FUNCTION journal_account_totals() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM accounts
     WHERE code IN (SELECT debit FROM new_lines UNION SELECT credit FROM new_lines)
     ORDER BY code FOR UPDATE;
    UPDATE accounts a SET debit_total = a.debit_total + s.debit, credit_total = a.credit_total + s.credit
      FROM (SELECT code, SUM(debit) AS debit, SUM(credit) AS credit FROM (
                SELECT debit AS code, amount AS debit, 0::BIGINT AS credit FROM new_lines
                UNION ALL
                SELECT credit AS code, 0::BIGINT AS debit, amount AS credit FROM new_lines) l
            GROUP BY code) s
     WHERE a.code = s.code;
    RETURN NULL;
END $$;

CREATE TRIGGER journal_account_totals AFTER INSERT ON journal
    REFERENCING NEW TABLE AS new_lines
    FOR EACH STATEMENT EXECUTE FUNCTION journal_account_totals();

CREATE FUNCTION journal_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'journal lines are never changed or deleted: post a correcting line';
END $$;

CREATE TRIGGER journal_append_only BEFORE UPDATE OR DELETE ON journal
    FOR EACH STATEMENT EXECUTE FUNCTION journal_append_only();

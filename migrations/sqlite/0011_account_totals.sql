-- Running debit and credit totals per account, kept by the database itself: every journal
-- line, whichever code path inserts it, adds its amount to both of its accounts in the same
-- transaction. The trial balance reads these instead of summing the whole journal (a 30-min
-- surge soak wrote 6.5M lines; summing them took 12.7 s). The journal is append-only.
ALTER TABLE accounts ADD COLUMN debit_total BIGINT NOT NULL DEFAULT 0;
ALTER TABLE accounts ADD COLUMN credit_total BIGINT NOT NULL DEFAULT 0;

UPDATE accounts SET
    debit_total = COALESCE((SELECT SUM(amount) FROM journal WHERE journal.debit = accounts.code), 0),
    credit_total = COALESCE((SELECT SUM(amount) FROM journal WHERE journal.credit = accounts.code), 0);

CREATE TRIGGER journal_account_totals AFTER INSERT ON journal
BEGIN
    UPDATE accounts SET debit_total = debit_total + NEW.amount WHERE code = NEW.debit;
    UPDATE accounts SET credit_total = credit_total + NEW.amount WHERE code = NEW.credit;
END;

CREATE TRIGGER journal_no_update BEFORE UPDATE ON journal
BEGIN
    SELECT RAISE(ABORT, 'journal lines are never changed: post a correcting line');
END;

CREATE TRIGGER journal_no_delete BEFORE DELETE ON journal
BEGIN
    SELECT RAISE(ABORT, 'journal lines are never deleted: post a correcting line');
END;

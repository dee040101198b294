-- Settlement: stock movements, double-entry journal, order costs, reservations, ERP outbox.

-- Append-only: every balance can be recomputed from these rows.
CREATE TABLE stock_movements (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ms BIGINT NOT NULL,
    buffer TEXT NOT NULL,
    sku TEXT NOT NULL,
    qty BIGINT NOT NULL,
    kind TEXT NOT NULL,
    order_id TEXT,
    source_kind TEXT NOT NULL,
    source_id TEXT NOT NULL
);
CREATE INDEX stock_movements_buffer ON stock_movements(buffer);

CREATE TABLE accounts (
    code TEXT PRIMARY KEY,
    name TEXT NOT NULL
);

-- Double entry: each row is one posting, debit and credit of the same amount.
CREATE TABLE journal (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    debit TEXT NOT NULL REFERENCES accounts(code),
    credit TEXT NOT NULL REFERENCES accounts(code),
    amount BIGINT NOT NULL CHECK (amount > 0),
    order_id TEXT,
    source_kind TEXT NOT NULL,
    source_id TEXT NOT NULL
);
CREATE INDEX journal_order ON journal(order_id);

-- What each order has put into WIP, for its cost report.
CREATE TABLE order_costs (
    order_id TEXT PRIMARY KEY,
    material BIGINT NOT NULL DEFAULT 0,
    conversion BIGINT NOT NULL DEFAULT 0,
    running_ms BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE reservations (
    id TEXT PRIMARY KEY,
    ref TEXT NOT NULL UNIQUE,
    sku TEXT NOT NULL,
    buffer TEXT NOT NULL REFERENCES buffers(id),
    quantity BIGINT NOT NULL CHECK (quantity > 0),
    status TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);

-- Settlement documents for the ERP, written in the same transaction as what they report.
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    doc_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    order_id TEXT,
    payload TEXT NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending',
    attempts BIGINT NOT NULL DEFAULT 0,
    last_error TEXT,
    next_attempt_ms BIGINT NOT NULL DEFAULT 0,
    created_ms BIGINT NOT NULL
);
CREATE INDEX outbox_status ON outbox(status, id);

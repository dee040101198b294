-- Inventory adjustments (counted stock that differs from the books), and a stock ledger
-- from which every buffer's on_hand can be recomputed, opening balance included.

-- One row per adjustment; `ref` is the caller's idempotency key.
CREATE TABLE stock_adjustments (
    id TEXT PRIMARY KEY,
    ref TEXT NOT NULL UNIQUE,
    buffer TEXT NOT NULL REFERENCES buffers(id),
    sku TEXT NOT NULL,
    quantity BIGINT NOT NULL CHECK (quantity <> 0),
    reason TEXT NOT NULL,
    on_hand_after BIGINT NOT NULL,
    actor TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);

-- Buffers created before this migration got their `initial` balance without a movement:
-- book the difference between on_hand and the movements as an opening movement.
INSERT INTO stock_movements (ts_ms, buffer, sku, qty, kind, order_id, source_kind, source_id)
SELECT 0, b.id, b.sku,
       b.on_hand - COALESCE((SELECT SUM(m.qty) FROM stock_movements m WHERE m.buffer = b.id), 0),
       'opening', NULL, 'plant', b.id
FROM buffers b
WHERE b.on_hand <> COALESCE((SELECT SUM(m.qty) FROM stock_movements m WHERE m.buffer = b.id), 0);

CREATE INDEX stock_movements_sku ON stock_movements(sku, id);

-- The stock ledger is append-only: the database refuses to change or delete a movement.
CREATE FUNCTION stock_movements_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'the stock-movement ledger is append-only';
END
$$ LANGUAGE plpgsql;
CREATE TRIGGER stock_movements_append_only BEFORE UPDATE OR DELETE ON stock_movements
    FOR EACH ROW EXECUTE FUNCTION stock_movements_append_only();

-- The stock-movement ledger loses its index on `buffer` alone. No query reads by it: the
-- ledger is read by SKU in id order (`stock_movements_sku`, migration 0008), with the
-- buffer, when given, as a filter on those rows. Every commit of telemetry appends movements
-- for several buffers, and this index put each buffer's at its own leaf page: on SQLite 4.2
-- of a flood commit's 28.7 written pages (WAL frames counted during a flood), and on both
-- databases one index insertion per movement.
DROP INDEX IF EXISTS stock_movements_buffer;

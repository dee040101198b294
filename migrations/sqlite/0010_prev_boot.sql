-- Where counting of a device's previous boot stopped (the work center's `prev_boot`),
-- committed with the cursor: a reading of that boot delivered after the new boot's first
-- one still counts what it adds after an MES restart. NULL: no previous boot to continue.
ALTER TABLE device_cursors ADD COLUMN prev_boot BIGINT;
ALTER TABLE device_cursors ADD COLUMN prev_seq BIGINT;
ALTER TABLE device_cursors ADD COLUMN prev_good BIGINT;
ALTER TABLE device_cursors ADD COLUMN prev_scrap BIGINT;

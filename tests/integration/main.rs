//! The one integration-test binary: spawns the real `mes` binary on free ports against a
//! real database and a real MQTT broker, and drives it only through its contract.
//!
//! Backends come from the environment, so the same tests run on both:
//! - `MES_TEST_DATABASE_URL` (a PostgreSQL admin URL, e.g.
//!   `postgres://postgres@127.0.0.1:5432/postgres`): each MES gets a fresh database;
//!   unset, each MES gets a fresh SQLite file.
//! - `MES_TEST_MQTT_URL` (e.g. `mqtt://127.0.0.1:1883`): an external broker; unset, each
//!   MES runs its embedded broker on a free port. Tests that need a broker that outlives
//!   the MES (kill -9 while devices publish) run only with an external broker.

mod driver;
mod harness;

mod bench;
mod cli;
mod cluster;
mod dashboard;
mod hostile;
mod http_fuzz;
mod influx;
mod ingest;
mod modbus;
mod orders;
mod planner;
mod recovery;
mod reliability;
mod scenarios;
mod settlement;
mod simulator;
mod sparkplug;

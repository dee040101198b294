//! Rebuilds the crate when a migration is added or changed: `sqlx::migrate!` embeds
//! `migrations/` at compile time, and without this Cargo does not know to look there (a
//! new migration file was left out of an incremental build of the binary).

fn main() {
    println!("cargo:rerun-if-changed=migrations");
}

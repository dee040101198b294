//! PLC register maps for Modbus TCP devices.
//!
//! A register map is a TOML file describing where a device model keeps its values
//! (which Modbus table, which address, which type and word order) and what they mean to
//! the MES (the `role`: state, good/scrap/boot counters, reason, target, command, order).
//! The format is documented in this crate's `README.md`.
//!
//! * [`RegisterMap::from_str`] / [`RegisterMap::load`] parse and validate a map, returning
//!   every problem with its line number ([`MapErrors`]).
//! * [`decode`], [`decode_bits`], [`encode`], [`encode_bits`] convert between raw Modbus
//!   data and [`Value`]s.
//! * [`plan`] computes the fewest Modbus reads for one poll; [`Snapshot::extract`] decodes
//!   their replies, and [`Snapshot::counters`] picks out the MES readings.
//! * [`check_file`] validates a file and returns a printable [`Summary`] (`mes check-map`).
//! * [`shipped_map`] gives the maps bundled with the crate by name.
//! * [`Point::wrap_bits`] and [`wrapping_delta`] handle counter wrap-around.

mod check;
mod codec;
mod error;
mod load;
mod plan;
mod schema;
mod tree;

pub use check::{check_file, check_str, Summary};
pub use codec::{decode, decode_bits, encode, encode_bits, Value};
pub use error::{MapError, MapErrors, Problem};
pub use plan::{
    extract, plan, plan_with, Counters, PlanOptions, RawData, ReadRequest, Reading, Snapshot, WriteRequest,
    DEFAULT_BIT_GAP, DEFAULT_REGISTER_GAP, MAX_READ_BITS, MAX_READ_REGISTERS,
};
pub use schema::{
    wrapping_delta, DataType, Kind, Point, RegisterMap, Role, WordOrder, COMMAND_START, COMMAND_STOP, MAX_ADDRESS,
    STATE_LABELS,
};

/// The maps shipped in `plc-maps/maps/`, as `(name, TOML text)`; the name is the file
/// name without `.toml` and equals the map's `name` key.
pub const SHIPPED_MAPS: &[(&str, &str)] =
    &[("press-v1", include_str!("../maps/press-v1.toml")), ("former-v2", include_str!("../maps/former-v2.toml"))];

/// The TOML text of the shipped map called `name` (e.g. `"press-v1"`), so a map can be
/// chosen by name without any file on disk.
pub fn shipped_map(name: &str) -> Option<&'static str> {
    SHIPPED_MAPS.iter().find(|(n, _)| *n == name).map(|(_, text)| *text)
}

impl RegisterMap {
    /// Load the shipped map called `name`; `None` if there is no such map.
    pub fn shipped(name: &str) -> Option<Result<RegisterMap, MapErrors>> {
        shipped_map(name).map(|text| RegisterMap::from_str(text, &format!("{name}.toml")))
    }
}

//! Typed form of a register map, produced by the loader.

use std::collections::BTreeMap;
use std::fmt;

use serde::Serialize;

/// Last valid Modbus address.
pub const MAX_ADDRESS: u16 = u16::MAX;

/// The Modbus data table a point lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Read/write single bits (function codes 1, 5, 15).
    Coil,
    /// Read-only single bits (function code 2).
    Discrete,
    /// Read-only 16-bit registers (function code 4).
    Input,
    /// Read/write 16-bit registers (function codes 3, 6, 16).
    Holding,
}

impl Kind {
    /// All kinds, in the order the planner emits requests.
    pub const ALL: [Kind; 4] = [Kind::Coil, Kind::Discrete, Kind::Input, Kind::Holding];

    /// The spelling used in map files.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Coil => "coil",
            Kind::Discrete => "discrete",
            Kind::Input => "input",
            Kind::Holding => "holding",
        }
    }

    /// Parse the map-file spelling.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// True for coils and discrete inputs (addressed in bits).
    pub fn is_bit(self) -> bool {
        matches!(self, Kind::Coil | Kind::Discrete)
    }

    /// True for the kinds the MES may write (holding registers and coils).
    pub fn is_writable(self) -> bool {
        matches!(self, Kind::Coil | Kind::Holding)
    }

    /// The Modbus function code that reads this table.
    pub fn read_function_code(self) -> u8 {
        match self {
            Kind::Coil => 1,
            Kind::Discrete => 2,
            Kind::Holding => 3,
            Kind::Input => 4,
        }
    }

    /// The largest count one Modbus read may ask for: 2000 bits or 125 registers.
    pub fn max_read(self) -> u16 {
        if self.is_bit() {
            crate::plan::MAX_READ_BITS
        } else {
            crate::plan::MAX_READ_REGISTERS
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The value type stored at a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DataType {
    /// One bit (coil/discrete) or one register where nonzero means true.
    Bool,
    /// Unsigned 16-bit, one register.
    U16,
    /// Signed 16-bit (two's complement), one register.
    I16,
    /// Unsigned 32-bit, two registers.
    U32,
    /// Signed 32-bit, two registers.
    I32,
    /// IEEE-754 single precision, two registers.
    F32,
    /// Unsigned 64-bit, four registers.
    U64,
}

impl DataType {
    /// All types.
    pub const ALL: [DataType; 7] =
        [DataType::Bool, DataType::U16, DataType::I16, DataType::U32, DataType::I32, DataType::F32, DataType::U64];

    /// The spelling used in map files.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "bool",
            DataType::U16 => "u16",
            DataType::I16 => "i16",
            DataType::U32 => "u32",
            DataType::I32 => "i32",
            DataType::F32 => "f32",
            DataType::U64 => "u64",
        }
    }

    /// Parse the map-file spelling.
    pub fn parse(s: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Number of 16-bit registers the type occupies in a register table.
    pub fn registers(self) -> u16 {
        match self {
            DataType::Bool | DataType::U16 | DataType::I16 => 1,
            DataType::U32 | DataType::I32 | DataType::F32 => 2,
            DataType::U64 => 4,
        }
    }

    /// Width of the value in bits (1 for bool).
    pub fn bits(self) -> u32 {
        match self {
            DataType::Bool => 1,
            other => u32::from(other.registers()) * 16,
        }
    }

    /// True for `u16`, `u32`, `u64`.
    pub fn is_unsigned_int(self) -> bool {
        matches!(self, DataType::U16 | DataType::U32 | DataType::U64)
    }

    /// True for every integer type (signed or unsigned, not bool or f32).
    pub fn is_integer(self) -> bool {
        matches!(self, DataType::U16 | DataType::I16 | DataType::U32 | DataType::I32 | DataType::U64)
    }

    /// True for the types that hold a number (everything but bool).
    pub fn is_numeric(self) -> bool {
        self != DataType::Bool
    }

    /// Smallest and largest raw value of an integer type (bool counts as 0..=1).
    /// `None` for `f32`.
    pub fn int_range(self) -> Option<(i128, i128)> {
        match self {
            DataType::Bool => Some((0, 1)),
            DataType::U16 => Some((0, i128::from(u16::MAX))),
            DataType::I16 => Some((i128::from(i16::MIN), i128::from(i16::MAX))),
            DataType::U32 => Some((0, i128::from(u32::MAX))),
            DataType::I32 => Some((i128::from(i32::MIN), i128::from(i32::MAX))),
            DataType::U64 => Some((0, i128::from(u64::MAX))),
            DataType::F32 => None,
        }
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a point means to the MES. A point without a role is a plain metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Machine state code; needs an `enum` naming each code.
    State,
    /// Cumulative good-part counter; wraps at 2^(type bits).
    Good,
    /// Cumulative scrap counter; wraps at 2^(type bits).
    Scrap,
    /// Boot (power-cycle) counter; a change means the other counters may have reset.
    Boot,
    /// Current stop/downtime reason code.
    Reason,
    /// Order quantity target, written by the MES.
    Target,
    /// Command register written by the MES: [`COMMAND_STOP`] or [`COMMAND_START`]
    /// (other codes are device specific and may be named with an `enum`).
    Command,
    /// Numeric order slot: the MES writes the active order number, the device echoes it.
    Order,
}

/// The labels a `state` point's enum may use: the MES machine states. Several device
/// codes may share one label (e.g. two fault codes both meaning `down`).
pub const STATE_LABELS: [&str; 5] = ["running", "idle", "setup", "down", "stopped"];

/// Value written to a `command` point to stop the machine.
pub const COMMAND_STOP: u16 = 0;
/// Value written to a `command` point to start the machine.
pub const COMMAND_START: u16 = 1;

impl Role {
    /// All roles.
    pub const ALL: [Role; 8] =
        [Role::State, Role::Good, Role::Scrap, Role::Boot, Role::Reason, Role::Target, Role::Command, Role::Order];

    /// The spelling used in map files.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::State => "state",
            Role::Good => "good",
            Role::Scrap => "scrap",
            Role::Boot => "boot",
            Role::Reason => "reason",
            Role::Target => "target",
            Role::Command => "command",
            Role::Order => "order",
        }
    }

    /// Parse the map-file spelling.
    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// True for the cumulative counters `good`, `scrap` and `boot`.
    pub fn is_counter(self) -> bool {
        matches!(self, Role::Good | Role::Scrap | Role::Boot)
    }

    /// True for the roles the MES writes (`target`, `command`); they must be writable.
    pub fn requires_writable(self) -> bool {
        matches!(self, Role::Target | Role::Command)
    }

    /// True for the roles that may carry an `enum` (`state` must, `reason` and
    /// `command` may).
    pub fn allows_enum(self) -> bool {
        matches!(self, Role::State | Role::Reason | Role::Command)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Order of the 16-bit words (and of the bytes inside them) of a multi-register value.
///
/// Letters name the bytes of the value from most (A) to least significant, in the order they
/// appear on the wire. For 64-bit values the same idea is generalised: `ABCD` is
/// most-significant word first, `CDAB` reverses the word order, `BADC` swaps the bytes in
/// each word, `DCBA` does both (fully little-endian).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub enum WordOrder {
    /// Big-endian words and bytes (register N holds the most significant word).
    #[default]
    ABCD,
    /// Word-swapped: least significant word first, bytes big-endian within each word.
    CDAB,
    /// Byte-swapped within each word, words big-endian.
    BADC,
    /// Fully little-endian.
    DCBA,
}

impl WordOrder {
    /// All word orders.
    pub const ALL: [WordOrder; 4] = [WordOrder::ABCD, WordOrder::CDAB, WordOrder::BADC, WordOrder::DCBA];

    /// The spelling used in map files.
    pub fn as_str(self) -> &'static str {
        match self {
            WordOrder::ABCD => "ABCD",
            WordOrder::CDAB => "CDAB",
            WordOrder::BADC => "BADC",
            WordOrder::DCBA => "DCBA",
        }
    }

    /// Parse the map-file spelling (upper case).
    pub fn parse(s: &str) -> Option<WordOrder> {
        WordOrder::ALL.into_iter().find(|w| w.as_str() == s)
    }

    /// True if the order reverses the sequence of words.
    pub fn swaps_words(self) -> bool {
        matches!(self, WordOrder::CDAB | WordOrder::DCBA)
    }

    /// True if the order swaps the two bytes inside each word.
    pub fn swaps_bytes(self) -> bool {
        matches!(self, WordOrder::BADC | WordOrder::DCBA)
    }

    /// Convert in place between canonical order (most significant word first, big-endian
    /// bytes) and this wire order. Every order is its own inverse, so the same call
    /// converts in both directions.
    pub fn reorder(self, words: &mut [u16]) {
        if self.swaps_words() {
            words.reverse();
        }
        if self.swaps_bytes() {
            for w in words.iter_mut() {
                *w = w.swap_bytes();
            }
        }
    }
}

impl fmt::Display for WordOrder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One named value in the device.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Point {
    /// Unique name within the map.
    pub name: String,
    /// The data table.
    pub kind: Kind,
    /// 0-based address of the first register or bit.
    pub address: u16,
    /// Value type (`type` in the file).
    #[serde(rename = "type")]
    pub ty: DataType,
    /// Meaning to the MES; `None` for a plain metric.
    pub role: Option<Role>,
    /// Factor applied to the decoded number (metrics only).
    pub scale: Option<f64>,
    /// Effective word order: the point's own, else the map's default. Only used for
    /// multi-register types; single registers are always read as big-endian u16.
    pub word_order: WordOrder,
    /// Whether the MES may write this point.
    pub writable: bool,
    /// Code → label table (`enum` in the file); empty if none.
    #[serde(rename = "enum")]
    pub enum_values: BTreeMap<u16, String>,
    /// Engineering unit, free text.
    pub unit: Option<String>,
    /// 1-based line of the point's `[[points]]` header in the map file.
    pub line: usize,
}

impl Point {
    /// Number of addresses the point occupies in its table: registers for
    /// input/holding, always 1 for coils and discrete inputs.
    pub fn width(&self) -> u16 {
        if self.kind.is_bit() {
            1
        } else {
            self.ty.registers()
        }
    }

    /// Last address occupied (inclusive), computed without overflow.
    pub fn last_address(&self) -> u32 {
        u32::from(self.address) + u32::from(self.width()) - 1
    }

    /// True if the point's role is a cumulative counter (`good`, `scrap`, `boot`).
    pub fn is_counter(&self) -> bool {
        self.role.is_some_and(Role::is_counter)
    }

    /// Bit width at which the raw value wraps around: 16, 32 or 64 for the unsigned
    /// integer types, `None` for every other type. For counters this is the modulus
    /// (2^bits) to use when computing deltas across a wrap.
    pub fn wrap_bits(&self) -> Option<u32> {
        self.ty.is_unsigned_int().then(|| self.ty.bits())
    }

    /// The lowest code whose enum label is `label`, if any.
    pub fn enum_code(&self, label: &str) -> Option<u16> {
        self.enum_values.iter().find(|(_, l)| l.as_str() == label).map(|(c, _)| *c)
    }
}

/// Increase of a counter of width `bits` from `previous` to `current`, assuming it
/// wrapped at most once: `(current - previous) mod 2^bits`. Values are first reduced to
/// `bits` bits; `bits` of 0 or 64 and above mean 64.
///
/// A counter that went backwards because the device reset it (see the `boot` role) is
/// indistinguishable from a wrap here; check the boot counter first.
pub fn wrapping_delta(previous: u64, current: u64, bits: u32) -> u64 {
    let mask = if bits == 0 || bits >= 64 { u64::MAX } else { (1u64 << bits) - 1 };
    current.wrapping_sub(previous) & mask
}

/// A whole register map: one device model's layout.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RegisterMap {
    /// Map name, e.g. `press-v1`.
    pub name: String,
    /// Map version, at least 1.
    pub version: u32,
    /// Default word order for multi-register values.
    pub word_order: WordOrder,
    /// The points, in file order.
    pub points: Vec<Point>,
}

impl RegisterMap {
    /// The point called `name`.
    pub fn point(&self, name: &str) -> Option<&Point> {
        self.points.iter().find(|p| p.name == name)
    }

    /// The point carrying `role` (roles are unique within a map).
    pub fn point_by_role(&self, role: Role) -> Option<&Point> {
        self.points.iter().find(|p| p.role == Some(role))
    }

    /// Wrap width in bits of the point carrying `role`, if that point exists and is an
    /// unsigned integer (see [`Point::wrap_bits`]).
    pub fn wrap_bits(&self, role: Role) -> Option<u32> {
        self.point_by_role(role).and_then(Point::wrap_bits)
    }

    /// The writable points, in file order.
    pub fn writable_points(&self) -> impl Iterator<Item = &Point> {
        self.points.iter().filter(|p| p.writable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapping_delta_per_width() {
        assert_eq!(wrapping_delta(10, 15, 16), 5);
        assert_eq!(wrapping_delta(65_530, 4, 16), 10);
        assert_eq!(wrapping_delta(u64::from(u32::MAX), 0, 32), 1);
        assert_eq!(wrapping_delta(u64::MAX - 1, 1, 64), 3);
        assert_eq!(wrapping_delta(7, 7, 32), 0);
    }

    #[test]
    fn word_orders_are_their_own_inverse() {
        for order in WordOrder::ALL {
            let mut w = [0x0102, 0x0304, 0x0506, 0x0708];
            order.reorder(&mut w);
            order.reorder(&mut w);
            assert_eq!(w, [0x0102, 0x0304, 0x0506, 0x0708]);
        }
    }

    #[test]
    fn vocabularies_round_trip() {
        for k in Kind::ALL {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        for t in DataType::ALL {
            assert_eq!(DataType::parse(t.as_str()), Some(t));
        }
        for r in Role::ALL {
            assert_eq!(Role::parse(r.as_str()), Some(r));
        }
        for w in WordOrder::ALL {
            assert_eq!(WordOrder::parse(w.as_str()), Some(w));
        }
        assert_eq!(Kind::Holding.read_function_code(), 3);
        assert_eq!(DataType::U64.registers(), 4);
        assert_eq!(DataType::Bool.bits(), 1);
    }
}

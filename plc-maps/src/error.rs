//! The crate's error type and the line-numbered problem list returned by the loader.

use std::fmt;

use crate::schema::{DataType, Kind, Role};

/// Every problem this crate can report: while loading and validating a map, and while
/// decoding, encoding or addressing values at run time.
///
/// Messages name the point (``point `good_count` ``) or the map (`map`) and the key at fault.
/// Load-time problems are wrapped in a [`Problem`] that adds the line number.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MapError {
    /// The map file could not be read.
    #[error("cannot read map file: {0}")]
    Io(String),

    /// The text is not valid TOML.
    #[error("TOML syntax error: {0}")]
    Syntax(String),

    /// A key that the format does not define.
    #[error("{at}: unknown key `{key}` (allowed keys: {allowed})")]
    UnknownKey {
        /// `map` or ``point `name` ``.
        at: String,
        /// The offending key.
        key: String,
        /// The keys that are allowed at this level.
        allowed: &'static str,
    },

    /// A required key is absent.
    #[error("{at}: missing required key `{key}`")]
    MissingKey {
        /// `map` or ``point `name` ``.
        at: String,
        /// The missing key.
        key: &'static str,
    },

    /// A key holds a value of the wrong TOML type.
    #[error("{at}: key `{key}` must be {expected}, found {found}")]
    WrongType {
        /// `map` or ``point `name` ``.
        at: String,
        /// The key.
        key: String,
        /// What the format wants.
        expected: &'static str,
        /// The TOML type that was found.
        found: &'static str,
    },

    /// A string key holds a value outside its fixed vocabulary (kind, type, role, word order).
    #[error("{at}: key `{key}` has unknown value `{value}` (expected one of: {expected})")]
    UnknownValue {
        /// `map` or ``point `name` ``.
        at: String,
        /// The key.
        key: &'static str,
        /// The value that was found.
        value: String,
        /// The accepted values.
        expected: &'static str,
    },

    /// A key holds a value of the right TOML type that is still unacceptable
    /// (out of range, empty, zero scale, ...).
    #[error("{at}: key `{key}`: {message}")]
    InvalidValue {
        /// `map` or ``point `name` ``.
        at: String,
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        message: String,
    },

    /// The map declares no points.
    #[error("map: `points` is empty; a map needs at least one [[points]] table")]
    NoPoints,

    /// Two points share a name.
    #[error("point `{point}`: duplicate point name (first defined on line {first_line})")]
    DuplicateName {
        /// The repeated name.
        point: String,
        /// Line of the first definition.
        first_line: usize,
    },

    /// A data type that the point's kind cannot carry (e.g. `u32` on a coil).
    #[error(
        "point `{point}`: key `type`: `{ty}` does not fit a {kind} point; coils and discrete inputs carry only `bool`"
    )]
    TypeNotAllowed {
        /// The point.
        point: String,
        /// Its declared type.
        ty: DataType,
        /// Its kind.
        kind: Kind,
    },

    /// The point's last address lies beyond 65535.
    #[error("point `{point}`: key `address`: `{ty}` at {kind} address {address} needs addresses up to {last}, past the last address 65535")]
    AddressOverflow {
        /// The point.
        point: String,
        /// Its kind.
        kind: Kind,
        /// Its type.
        ty: DataType,
        /// Its first address.
        address: u16,
        /// The last address it would need.
        last: u32,
    },

    /// Two points of the same kind claim a common address.
    #[error("point `{point}`: key `address`: {kind} addresses {start}..={end} overlap point `{other}` ({other_start}..={other_end}, line {other_line})")]
    Overlap {
        /// The point reported (the one defined later in the file).
        point: String,
        /// The shared kind.
        kind: Kind,
        /// First address of `point`.
        start: u16,
        /// Last address of `point`.
        end: u16,
        /// The point it collides with.
        other: String,
        /// First address of `other`.
        other_start: u16,
        /// Last address of `other`.
        other_end: u16,
        /// Line of the `[[points]]` header of `other`.
        other_line: usize,
    },

    /// `writable = true` on a read-only kind.
    #[error("point `{point}`: key `writable`: the {kind} table is read-only; only holding registers and coils can be written")]
    NotWritableKind {
        /// The point.
        point: String,
        /// Its kind.
        kind: Kind,
    },

    /// A role that was already taken by another point.
    #[error("point `{point}`: key `role`: role `{role}` is already used by point `{other}` (line {other_line})")]
    DuplicateRole {
        /// The later point.
        point: String,
        /// The role.
        role: Role,
        /// The point that has it first.
        other: String,
        /// Line of that point's header.
        other_line: usize,
    },

    /// A role that requires an unsigned integer type (every role does).
    #[error(
        "point `{point}`: key `type`: role `{role}` needs an unsigned integer type (u16, u32 or u64), found `{ty}`"
    )]
    RoleType {
        /// The point.
        point: String,
        /// Its role.
        role: Role,
        /// Its type.
        ty: DataType,
    },

    /// A role that forbids `scale` (every role does).
    #[error("point `{point}`: key `scale`: role `{role}` carries raw device values and cannot be scaled")]
    RoleScale {
        /// The point.
        point: String,
        /// Its role.
        role: Role,
    },

    /// A role that forbids an `enum` table.
    #[error("point `{point}`: key `enum`: role `{role}` is numeric and cannot have an enum")]
    RoleEnum {
        /// The point.
        point: String,
        /// Its role.
        role: Role,
    },

    /// A role (`target`, `command`) that must be writable.
    #[error("point `{point}`: key `role`: role `{role}` is written by the MES and needs `writable = true`")]
    RoleNotWritable {
        /// The point.
        point: String,
        /// Its role.
        role: Role,
    },

    /// The `state` role without an `enum` table.
    #[error("point `{point}`: key `role`: role `state` needs an `enum` table mapping codes to state names")]
    StateWithoutEnum {
        /// The point.
        point: String,
    },

    /// A `state` enum label outside the MES state vocabulary ([`crate::STATE_LABELS`]).
    #[error("point `{point}`: key `enum`: state label {label:?} is not an MES state (expected one of: running, idle, setup, down, stopped)")]
    StateLabel {
        /// The point.
        point: String,
        /// The label.
        label: String,
    },

    /// An `enum` key that is not an integer code the type can hold.
    #[error("point `{point}`: key `enum`: key `{key}` is not an integer code in 0..={max}")]
    EnumKey {
        /// The point.
        point: String,
        /// The offending key as written.
        key: String,
        /// The largest code accepted.
        max: u16,
    },

    /// An `enum` value that is not a non-empty string.
    #[error("point `{point}`: key `enum`: the label for code `{key}` must be a non-empty string")]
    EnumLabel {
        /// The point.
        point: String,
        /// The code as written.
        key: String,
    },

    /// Two `enum` keys that denote the same code (`1` and `01`).
    #[error("point `{point}`: key `enum`: {message}")]
    EnumDuplicate {
        /// The point.
        point: String,
        /// Which code or label repeats.
        message: String,
    },

    /// An `enum` on a type that is not an integer.
    #[error("point `{point}`: key `enum`: enums need an integer type, not `{ty}`")]
    EnumOnNonInteger {
        /// The point.
        point: String,
        /// Its type.
        ty: DataType,
    },

    /// `scale` where it has no meaning (bool, enum points).
    #[error("point `{point}`: key `scale`: {reason}")]
    ScaleNotAllowed {
        /// The point.
        point: String,
        /// Why not.
        reason: &'static str,
    },

    /// A per-point `word_order` on a single-register value.
    #[error("point `{point}`: key `word_order`: `{ty}` occupies one register, so a word order has no effect")]
    WordOrderUnused {
        /// The point.
        point: String,
        /// Its type.
        ty: DataType,
    },

    /// Fewer registers or bits than the point needs were supplied to a decoder.
    #[error("point `{point}`: needs {needed} {unit}, got {got}")]
    ShortData {
        /// The point.
        point: String,
        /// How many it needs.
        needed: usize,
        /// How many were supplied.
        got: usize,
        /// `registers` or `bits`.
        unit: &'static str,
    },

    /// Register data offered for a bit point or bit data for a register point.
    #[error("point `{point}` is a {kind}; it is decoded from {expected}")]
    DataKind {
        /// The point.
        point: String,
        /// Its kind.
        kind: Kind,
        /// `registers` or `bits`.
        expected: &'static str,
    },

    /// A value that cannot be represented in the point's type.
    #[error("point `{point}`: cannot encode {value} as {ty}: {reason}")]
    Encode {
        /// The point.
        point: String,
        /// The value, formatted.
        value: String,
        /// The point's type.
        ty: DataType,
        /// Why not.
        reason: String,
    },

    /// No point of that name in the map.
    #[error("no point named `{0}` in the map")]
    UnknownPoint(String),

    /// A write to a point that is not `writable`.
    #[error("point `{0}` is not writable")]
    NotWritable(String),
}

/// One load-time problem: a [`MapError`] and the 1-based line it refers to
/// (0 when it concerns no line, e.g. an unreadable file).
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// 1-based line number in the map file; 0 if not tied to a line.
    pub line: usize,
    /// What is wrong.
    pub error: MapError,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.error)
        } else {
            write!(f, "{}: {}", self.line, self.error)
        }
    }
}

/// Every problem found in one map, sorted by line.
///
/// Displays one problem per line as `SOURCE:LINE: message` (or `SOURCE: message` for
/// problems without a line), the format compilers use, so editors can jump to them.
#[derive(Debug, Clone, PartialEq)]
pub struct MapErrors {
    /// The file name (or other label) given to the loader.
    pub source: String,
    /// The problems, in line order; never empty when returned by the loader.
    pub problems: Vec<Problem>,
}

impl MapErrors {
    /// A list with a single problem.
    pub fn single(source: impl Into<String>, line: usize, error: MapError) -> Self {
        MapErrors { source: source.into(), problems: vec![Problem { line, error }] }
    }

    /// Number of problems.
    pub fn len(&self) -> usize {
        self.problems.len()
    }

    /// True if there are no problems.
    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    /// Iterate over the problems.
    pub fn iter(&self) -> std::slice::Iter<'_, Problem> {
        self.problems.iter()
    }
}

impl fmt::Display for MapErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            if p.line == 0 {
                write!(f, "{}: {}", self.source, p.error)?;
            } else {
                write!(f, "{}:{}: {}", self.source, p.line, p.error)?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for MapErrors {}

impl<'a> IntoIterator for &'a MapErrors {
    type Item = &'a Problem;
    type IntoIter = std::slice::Iter<'a, Problem>;
    fn into_iter(self) -> Self::IntoIter {
        self.problems.iter()
    }
}

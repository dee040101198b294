//! `mes check-map`: validate a map and summarise it.

use std::fmt;
use std::path::Path;

use serde::Serialize;

use crate::error::MapErrors;
use crate::plan::{plan, ReadRequest};
use crate::schema::RegisterMap;

/// What `check-map` prints for a valid map.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Map name.
    pub name: String,
    /// Map version.
    pub version: u32,
    /// Number of points.
    pub points: usize,
    /// Number of Modbus reads one poll takes (the length of [`Summary::requests`]).
    pub requests_per_poll: usize,
    /// The planned reads.
    pub requests: Vec<ReadRequest>,
    /// Names of the writable points, in file order.
    pub writable: Vec<String>,
}

impl Summary {
    /// Summarise a loaded map.
    pub fn of(map: &RegisterMap) -> Summary {
        let requests = plan(map);
        Summary {
            name: map.name.clone(),
            version: map.version,
            points: map.points.len(),
            requests_per_poll: requests.len(),
            requests,
            writable: map.writable_points().map(|p| p.name.clone()).collect(),
        }
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "map {} version {}: {} point{}, {} read request{} per poll",
            self.name,
            self.version,
            self.points,
            if self.points == 1 { "" } else { "s" },
            self.requests_per_poll,
            if self.requests_per_poll == 1 { "" } else { "s" },
        )?;
        for r in &self.requests {
            writeln!(f, "  read {r}")?;
        }
        if self.writable.is_empty() {
            write!(f, "  writable: none")
        } else {
            write!(f, "  writable: {}", self.writable.join(", "))
        }
    }
}

/// Load and validate the map file at `path` and summarise it.
pub fn check_file(path: impl AsRef<Path>) -> Result<Summary, MapErrors> {
    RegisterMap::load(path).map(|m| Summary::of(&m))
}

/// Validate map `text` (labelled `source_name` in problems) and summarise it.
pub fn check_str(text: &str, source_name: &str) -> Result<Summary, MapErrors> {
    RegisterMap::from_str(text, source_name).map(|m| Summary::of(&m))
}

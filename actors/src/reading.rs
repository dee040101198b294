//! The one normalized input every adapter (MQTT JSON, Modbus, Sparkplug) produces.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

/// What a machine reports it is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum MachineState {
    Running,
    Idle,
    Setup,
    Down,
    #[default]
    Stopped,
}

impl MachineState {
    pub fn as_str(self) -> &'static str {
        match self {
            MachineState::Running => "running",
            MachineState::Idle => "idle",
            MachineState::Setup => "setup",
            MachineState::Down => "down",
            MachineState::Stopped => "stopped",
        }
    }
}

impl fmt::Display for MachineState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for MachineState {
    type Err = ReadingError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "running" => MachineState::Running,
            "idle" => MachineState::Idle,
            "setup" => MachineState::Setup,
            "down" => MachineState::Down,
            "stopped" => MachineState::Stopped,
            other => return Err(ReadingError::UnknownState(other.chars().take(64).collect())),
        })
    }
}

/// Why an input could not become a [`Reading`]; becomes a dead letter's reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadingError {
    #[error("unknown state `{0}` (expected running, idle, setup, down or stopped)")]
    UnknownState(String),
    #[error("field `{0}` is too long (at most {1} characters)")]
    TooLong(&'static str, usize),
    #[error("{0}")]
    Invalid(String),
}

/// Longest id (device, order, reason) accepted from the wire.
pub const MAX_ID_LEN: usize = 128;
/// Most metrics accepted in one reading.
pub const MAX_METRICS: usize = 64;

/// One device report: cumulative counters since `boot`, and what the machine is doing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reading {
    pub device: String,
    pub boot: u64,
    pub seq: u64,
    /// Device time, ms since the epoch, if it sent one.
    pub ts_ms: Option<i64>,
    pub good: u64,
    pub scrap: u64,
    pub state: Option<MachineState>,
    pub reason: Option<String>,
    pub order: Option<String>,
    pub metrics: BTreeMap<String, f64>,
}

impl Reading {
    /// Checks the limits that keep one reading bounded in size.
    pub fn validate(&self) -> Result<(), ReadingError> {
        let check = |name: &'static str, v: &Option<String>| match v {
            Some(s) if s.chars().count() > MAX_ID_LEN => Err(ReadingError::TooLong(name, MAX_ID_LEN)),
            Some(s) if s.is_empty() => Err(ReadingError::Invalid(format!("field `{name}` is empty"))),
            Some(s) if s.chars().any(char::is_control) => {
                Err(ReadingError::Invalid(format!("field `{name}` holds a control character")))
            }
            _ => Ok(()),
        };
        check("order", &self.order)?;
        check("reason", &self.reason)?;
        if self.device.is_empty() || self.device.chars().count() > MAX_ID_LEN {
            return Err(ReadingError::TooLong("device", MAX_ID_LEN));
        }
        if let Some(k) = self.metrics.keys().find(|k| k.is_empty() || k.chars().any(char::is_control)) {
            return Err(ReadingError::Invalid(format!("metric name {k:?} is empty or holds a control character")));
        }
        if self.metrics.len() > MAX_METRICS {
            return Err(ReadingError::Invalid(format!(
                "too many metrics ({}, at most {MAX_METRICS})",
                self.metrics.len()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip() {
        for s in ["running", "idle", "setup", "down", "stopped"] {
            assert_eq!(s.parse::<MachineState>().map(|m| m.as_str()), Ok(s));
        }
        assert!(matches!("exploded".parse::<MachineState>(), Err(ReadingError::UnknownState(_))));
    }

    #[test]
    fn control_characters_are_refused() {
        let mut r = Reading {
            device: "d".into(),
            boot: 1,
            seq: 1,
            ts_ms: None,
            good: 0,
            scrap: 0,
            state: None,
            reason: None,
            order: Some("PO\u{0}1".into()),
            metrics: BTreeMap::new(),
        };
        assert!(matches!(r.validate(), Err(ReadingError::Invalid(_))));
        r.order = Some("PO-1".into());
        assert_eq!(r.validate(), Ok(()));
        r.metrics.insert("t\u{7}".into(), 1.0);
        assert!(matches!(r.validate(), Err(ReadingError::Invalid(_))));
    }
}

//! Production order lifecycle: `planned → released → running → completed → closed`, and
//! `cancelled` before work starts.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    Planned,
    Released,
    Running,
    Completed,
    Closed,
    Cancelled,
}

/// What a planner asks of an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderCommand {
    Release,
    Close,
    Cancel,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {command} an order that is {from}")]
pub struct TransitionError {
    pub command: &'static str,
    pub from: OrderStatus,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Planned => "planned",
            OrderStatus::Released => "released",
            OrderStatus::Running => "running",
            OrderStatus::Completed => "completed",
            OrderStatus::Closed => "closed",
            OrderStatus::Cancelled => "cancelled",
        }
    }

    /// The status a planner's command leads to, or why it is not allowed.
    pub fn apply(self, cmd: OrderCommand) -> Result<OrderStatus, TransitionError> {
        use OrderStatus::*;
        let (name, to) = match (cmd, self) {
            (OrderCommand::Release, Planned) => ("release", Released),
            (OrderCommand::Close, Running | Completed) => ("close", Closed),
            (OrderCommand::Cancel, Planned | Released) => ("cancel", Cancelled),
            (OrderCommand::Release, _) => return Err(TransitionError { command: "release", from: self }),
            (OrderCommand::Close, _) => return Err(TransitionError { command: "close", from: self }),
            (OrderCommand::Cancel, _) => return Err(TransitionError { command: "cancel", from: self }),
        };
        debug_assert!(!name.is_empty());
        Ok(to)
    }

    /// The status after output: first output starts a released order, reaching the
    /// quantity completes it. Output beyond the quantity is still counted by the caller.
    pub fn after_output(self, good_after: u64, quantity: u64) -> OrderStatus {
        use OrderStatus::*;
        match self {
            Released | Running if good_after >= quantity => Completed,
            Released => Running,
            other => other,
        }
    }

    /// Statuses that accept output (the line may run on a completed order too).
    pub fn is_open(self) -> bool {
        matches!(self, OrderStatus::Released | OrderStatus::Running | OrderStatus::Completed)
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OrderStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "planned" => OrderStatus::Planned,
            "released" => OrderStatus::Released,
            "running" => OrderStatus::Running,
            "completed" => OrderStatus::Completed,
            "closed" => OrderStatus::Closed,
            "cancelled" => OrderStatus::Cancelled,
            other => return Err(format!("unknown order status `{other}`")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::OrderCommand::*;
    use super::OrderStatus::*;

    #[test]
    fn planner_transitions() {
        assert_eq!(Planned.apply(Release), Ok(Released));
        assert_eq!(Released.apply(Cancel), Ok(Cancelled));
        assert_eq!(Running.apply(Close), Ok(Closed));
        assert_eq!(Completed.apply(Close), Ok(Closed));
        assert!(Released.apply(Release).is_err());
        assert!(Planned.apply(Close).is_err());
        assert!(Running.apply(Cancel).is_err());
        assert!(Closed.apply(Cancel).is_err());
        assert_eq!(
            Closed.apply(Release).map_err(|e| e.to_string()),
            Err("cannot release an order that is closed".to_string())
        );
    }

    #[test]
    fn output_drives_status() {
        assert_eq!(Released.after_output(1, 10), Running);
        assert_eq!(Running.after_output(9, 10), Running);
        assert_eq!(Running.after_output(10, 10), Completed);
        assert_eq!(Released.after_output(12, 10), Completed);
        assert_eq!(Completed.after_output(15, 10), Completed);
        assert_eq!(Planned.after_output(5, 10), Planned);
        assert_eq!(Closed.after_output(50, 10), Closed);
    }
}

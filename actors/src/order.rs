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
#[error("cannot {command} an order that is {from} ({from} → {to} is not allowed)")]
pub struct TransitionError {
    pub command: &'static str,
    pub from: OrderStatus,
    /// The status the command would have led to.
    pub to: OrderStatus,
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
            (OrderCommand::Release, _) => return Err(TransitionError { command: "release", from: self, to: Released }),
            (OrderCommand::Close, _) => return Err(TransitionError { command: "close", from: self, to: Closed }),
            (OrderCommand::Cancel, _) => return Err(TransitionError { command: "cancel", from: self, to: Cancelled }),
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

/// An order's live progress, for milestone events on the way to its quantity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderProgress {
    pub id: String,
    pub quantity: u64,
    pub good: u64,
    pub scrap: u64,
    pub status: OrderStatus,
    /// Last tenth of the quantity reported (0..=10).
    pub tenths: u64,
}

/// What changed with a committed update of an order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressEvent {
    /// Good output crossed another tenth of the quantity (10 %, 20 %, ...).
    Milestone(u64),
    Status(OrderStatus, OrderStatus),
}

impl OrderProgress {
    pub fn new(id: impl Into<String>, quantity: u64, good: u64, scrap: u64, status: OrderStatus) -> Self {
        let tenths = Self::tenths_of(good, quantity);
        Self { id: id.into(), quantity, good, scrap, status, tenths }
    }

    fn tenths_of(good: u64, quantity: u64) -> u64 {
        if quantity == 0 {
            return 10;
        }
        (good.saturating_mul(10) / quantity).min(10)
    }

    /// Takes the committed totals and status; returns the events they imply.
    pub fn observe(&mut self, good: u64, scrap: u64, status: OrderStatus) -> Vec<ProgressEvent> {
        let mut out = Vec::new();
        if status != self.status {
            out.push(ProgressEvent::Status(self.status, status));
        }
        let tenths = Self::tenths_of(good, self.quantity);
        if tenths > self.tenths {
            out.push(ProgressEvent::Milestone(tenths * 10));
        }
        self.good = good;
        self.scrap = scrap;
        self.status = status;
        self.tenths = self.tenths.max(tenths);
        out
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
            Err("cannot release an order that is closed (closed → released is not allowed)".to_string())
        );
    }

    #[test]
    fn progress_reports_milestones_and_status_once() {
        use super::{OrderProgress, ProgressEvent};
        let mut p = OrderProgress::new("PO-1", 200, 0, 0, Released);
        assert_eq!(p.observe(15, 0, Running), vec![ProgressEvent::Status(Released, Running)]);
        assert_eq!(p.observe(45, 1, Running), vec![ProgressEvent::Milestone(20)]);
        assert_eq!(p.observe(46, 1, Running), vec![]);
        assert_eq!(
            p.observe(210, 2, Completed),
            vec![ProgressEvent::Status(Running, Completed), ProgressEvent::Milestone(100)]
        );
        assert_eq!(p.observe(230, 2, Completed), vec![]);
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

//! A material buffer's alert state: shortage below zero, full above capacity.
//!
//! Production is booked even when a buffer would go below zero (the parts physically
//! exist); the buffer then raises a `material_shortage` alert, and clears it when stock
//! returns. Alerts are edge-triggered: raised once, cleared once.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    MaterialShortage,
    BufferFull,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::MaterialShortage => "material_shortage",
            AlertKind::BufferFull => "buffer_full",
        }
    }
}

/// A change of a buffer's alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertChange {
    /// Raised, with how far stock is past the limit (the shortfall, or the excess).
    Raised(AlertKind, i64),
    Cleared(AlertKind),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BufferState {
    pub id: String,
    pub sku: String,
    pub capacity: i64,
    pub on_hand: i64,
    pub alert: Option<AlertKind>,
}

impl BufferState {
    pub fn new(id: impl Into<String>, sku: impl Into<String>, capacity: i64, on_hand: i64) -> Self {
        let mut b = Self { id: id.into(), sku: sku.into(), capacity, on_hand, alert: None };
        b.alert = b.condition().map(|(k, _)| k);
        b
    }

    fn condition(&self) -> Option<(AlertKind, i64)> {
        if self.on_hand < 0 {
            Some((AlertKind::MaterialShortage, -self.on_hand))
        } else if self.on_hand > self.capacity {
            Some((AlertKind::BufferFull, self.on_hand - self.capacity))
        } else {
            None
        }
    }

    /// Takes the committed balance; returns the alert changes it causes (at most a clear
    /// and a raise).
    pub fn observe(&mut self, on_hand: i64) -> Vec<AlertChange> {
        self.on_hand = on_hand;
        let now = self.condition();
        let mut out = Vec::new();
        match (self.alert, now) {
            (Some(a), Some((b, _))) if a == b => {}
            (prev, next) => {
                if let Some(a) = prev {
                    out.push(AlertChange::Cleared(a));
                }
                if let Some((b, by)) = next {
                    out.push(AlertChange::Raised(b, by));
                }
            }
        }
        self.alert = now.map(|(k, _)| k);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_are_raised_and_cleared_once() {
        let mut b = BufferState::new("RM", "SHEET", 100, 10);
        assert_eq!(b.observe(4), vec![]);
        assert_eq!(b.observe(-3), vec![AlertChange::Raised(AlertKind::MaterialShortage, 3)]);
        assert_eq!(b.observe(-9), vec![], "still short: no new alert");
        assert_eq!(b.observe(0), vec![AlertChange::Cleared(AlertKind::MaterialShortage)]);
        assert_eq!(b.observe(150), vec![AlertChange::Raised(AlertKind::BufferFull, 50)]);
        assert_eq!(
            b.observe(-1),
            vec![AlertChange::Cleared(AlertKind::BufferFull), AlertChange::Raised(AlertKind::MaterialShortage, 1)]
        );
        assert_eq!(BufferState::new("X", "Y", 5, -2).alert, Some(AlertKind::MaterialShortage));
    }
}

//! Actix shells around the pure state machines.
//!
//! Each actor has a bounded mailbox; callers use `try_send` or `send` (which waits for
//! room), never `do_send`, so a surge pushes back on its source instead of growing memory.

use crate::buffer::{AlertChange, BufferState};
use crate::order::{OrderProgress, OrderStatus, ProgressEvent};
use crate::reading::Reading;
use crate::work_center::{Held, Outcome, WorkCenterState};
use actix::prelude::*;
use std::sync::{Arc, Mutex, MutexGuard};

/// Default bound of every actor mailbox.
pub const MAILBOX_CAPACITY: usize = 1024;

/// A work center's state, shared by its actor and the ingest path: readings are applied
/// where they are received, under the lock, instead of crossing to the actor's thread and
/// back (measured in docs/BENCHMARKS.md, session 14); the actor answers queries and planner
/// commands on the same state. The lock is held only for one pure state transition.
#[derive(Clone)]
pub struct WorkCenterCell(Arc<Mutex<WorkCenterState>>);

impl WorkCenterCell {
    pub fn new(state: WorkCenterState) -> Self {
        Self(Arc::new(Mutex::new(state)))
    }

    /// The state, locked. A panic while it was held (a defect in `then`, since `apply`'s
    /// are caught) leaves a state that was consistent before it: it is used as it is.
    fn lock(&self) -> MutexGuard<'_, WorkCenterState> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies a reading and hands the outcome to `then` while the state is still locked,
    /// so that a work center's outcomes leave in the order they were applied, whichever
    /// task applies them.
    ///
    /// A reading whose application panics (a defect, never expected) does not take the
    /// work center down: its state goes back to what it was before that reading (which is
    /// what is committed plus what is queued for commit, so the writer's queue stays
    /// consistent with it), and the reading is held for review like an implausible one,
    /// nothing booked. Rebuilding from the database instead would be wrong while the
    /// writer still holds this work center's applied readings: the next delta would count
    /// them again.
    pub fn apply_then<R>(&self, reading: &Reading, then: impl FnOnce(Outcome) -> R) -> R {
        let mut state = self.lock();
        let before = state.clone();
        let outcome = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| state.apply(reading))) {
            Ok(o) => o,
            Err(panic) => {
                *state = before;
                PANICS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Outcome::Held(Held {
                    device: reading.device.clone(),
                    reason: format!(
                        "internal error applying this reading to {} ({what}); the work center went back to its state before it; held for review, nothing booked",
                        state.id
                    ),
                    payload: format!(
                        r#"{{"boot":{},"seq":{},"good":{},"scrap":{}}}"#,
                        reading.boot, reading.seq, reading.good, reading.scrap
                    ),
                })
            }
        };
        then(outcome)
    }

    /// A copy of the current state.
    pub fn snapshot(&self) -> WorkCenterState {
        self.lock().clone()
    }

    /// Sets (or clears) the order the work center is working on.
    pub fn set_order(&self, order: Option<String>) {
        self.lock().set_order(order);
    }
}

/// One actor per work center: owns its device cursor and current order (through its
/// [`WorkCenterCell`], which the ingest path applies readings to directly).
pub struct WorkCenterActor {
    cell: WorkCenterCell,
}

impl WorkCenterActor {
    pub fn new(state: WorkCenterState) -> Self {
        Self { cell: WorkCenterCell::new(state) }
    }

    /// The state this actor shares with the ingest path.
    pub fn cell(&self) -> WorkCenterCell {
        self.cell.clone()
    }
}

impl Actor for WorkCenterActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
    }
}

/// Apply a reading and hand the outcome to `then`, for callers that hold only the actor's
/// address (ingest applies readings to the [`WorkCenterCell`] directly). Sent with
/// `try_send`, it keeps the order in which the caller received readings (a plain `send`
/// that waits for mailbox room may overtake another).
#[derive(Message)]
#[rtype(result = "()")]
pub struct ApplyThen(pub Reading, pub Box<dyn FnOnce(Outcome) + Send>);

/// Readings whose application panicked (a defect), since start; `mes_actor_panics_total`.
pub static PANICS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Handler<ApplyThen> for WorkCenterActor {
    type Result = ();

    /// See [`WorkCenterCell::apply_then`].
    fn handle(&mut self, msg: ApplyThen, _ctx: &mut Self::Context) {
        let ApplyThen(reading, then) = msg;
        self.cell.apply_then(&reading, then);
    }
}

/// A copy of the current state (for the API and the dashboard).
#[derive(Message)]
#[rtype(result = "WorkCenterState")]
pub struct GetState;

impl Handler<GetState> for WorkCenterActor {
    type Result = MessageResult<GetState>;

    fn handle(&mut self, _msg: GetState, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.cell.snapshot())
    }
}

/// Set (or clear) the order the work center is working on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetOrder(pub Option<String>);

impl Handler<SetOrder> for WorkCenterActor {
    type Result = ();

    fn handle(&mut self, msg: SetOrder, _ctx: &mut Self::Context) {
        self.cell.set_order(msg.0);
    }
}

/// Where an actor reports what it noticed (the root crate publishes it as live events).
pub type Sink<T> = Box<dyn Fn(&str, T) + Send>;

/// One actor per material buffer: follows the committed balance and raises or clears
/// shortage and buffer-full alerts once per crossing.
pub struct BufferActor {
    state: BufferState,
    sink: Sink<AlertChange>,
}

impl BufferActor {
    pub fn new(state: BufferState, sink: Sink<AlertChange>) -> Self {
        Self { state, sink }
    }
}

impl Actor for BufferActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
    }
}

/// A committed balance.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Balance(pub i64);

impl Handler<Balance> for BufferActor {
    type Result = ();

    fn handle(&mut self, msg: Balance, _ctx: &mut Self::Context) {
        for change in self.state.observe(msg.0) {
            (self.sink)(&self.state.id, change);
        }
    }
}

/// A copy of the buffer's state.
#[derive(Message)]
#[rtype(result = "BufferState")]
pub struct GetBuffer;

impl Handler<GetBuffer> for BufferActor {
    type Result = MessageResult<GetBuffer>;

    fn handle(&mut self, _msg: GetBuffer, _ctx: &mut Self::Context) -> Self::Result {
        MessageResult(self.state.clone())
    }
}

/// One actor per open production order: follows its committed totals and status and
/// reports milestones and status changes.
pub struct OrderActor {
    state: OrderProgress,
    sink: Sink<ProgressEvent>,
}

impl OrderActor {
    pub fn new(state: OrderProgress, sink: Sink<ProgressEvent>) -> Self {
        Self { state, sink }
    }
}

impl Actor for OrderActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX_CAPACITY);
    }
}

/// Committed totals and status of an order.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Progress {
    pub good: u64,
    pub scrap: u64,
    pub status: OrderStatus,
}

impl Handler<Progress> for OrderActor {
    type Result = ();

    fn handle(&mut self, msg: Progress, ctx: &mut Self::Context) {
        for ev in self.state.observe(msg.good, msg.scrap, msg.status) {
            (self.sink)(&self.state.id, ev);
        }
        if matches!(self.state.status, OrderStatus::Closed | OrderStatus::Cancelled) {
            ctx.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reading::MachineState;
    use std::collections::BTreeMap;

    #[actix::test]
    async fn buffer_actor_reports_each_crossing_once() {
        use std::sync::{Arc, Mutex};
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s2 = seen.clone();
        let sink: Sink<AlertChange> = Box::new(move |id, c| s2.lock().expect("lock").push((id.to_string(), c)));
        let addr = BufferActor::new(BufferState::new("RM", "SHEET", 100, 5), sink).start();
        for b in [3, -2, -5, 1] {
            addr.send(Balance(b)).await.expect("alive");
        }
        let st = addr.send(GetBuffer).await.expect("alive");
        assert_eq!((st.on_hand, st.alert), (1, None));
        use crate::buffer::AlertKind::MaterialShortage;
        assert_eq!(
            *seen.lock().expect("lock"),
            vec![
                ("RM".to_string(), AlertChange::Raised(MaterialShortage, 2)),
                ("RM".to_string(), AlertChange::Cleared(MaterialShortage))
            ]
        );
    }

    /// A reading that makes the state machine panic (here a routing defect caught by a
    /// debug assertion) is held, the state is as before, and the next reading counts.
    #[cfg(debug_assertions)]
    #[actix::test]
    async fn a_panicking_reading_is_held_and_the_work_center_goes_on() {
        use std::sync::{Arc, Mutex};
        let addr = WorkCenterActor::new(WorkCenterState::new("PRESS-1", "press-01")).start();
        let reading = |device: &str, seq, good| Reading {
            device: device.into(),
            boot: 1,
            seq,
            ts_ms: None,
            good,
            scrap: 0,
            state: Some(MachineState::Running),
            reason: None,
            order: None,
            metrics: BTreeMap::new(),
        };
        let seen = Arc::new(Mutex::new(Vec::new()));
        for r in [reading("press-01", 1, 3), reading("elsewhere", 2, 50), reading("press-01", 3, 9)] {
            let s = seen.clone();
            addr.send(ApplyThen(r, Box::new(move |o| s.lock().expect("lock").push(o)))).await.expect("actor alive");
        }
        let seen = seen.lock().expect("lock").clone();
        assert!(matches!(&seen[0], Outcome::Counted(d) if d.good == 3));
        assert!(matches!(&seen[1], Outcome::Held(h) if h.reason.contains("internal error")), "{:?}", seen[1]);
        assert!(matches!(&seen[2], Outcome::Counted(d) if d.good == 6));
        let s = addr.send(GetState).await.expect("actor alive");
        assert_eq!((s.good_total, s.cursor.map(|c| c.seq)), (9, Some(3)));
        assert!(PANICS.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    }

    #[actix::test]
    async fn actor_applies_readings_in_order() {
        let addr = WorkCenterActor::new(WorkCenterState::new("PRESS-1", "press-01")).start();
        for (seq, good) in [(1, 3), (2, 7), (2, 7), (1, 3), (3, 9)] {
            let reading = Reading {
                device: "press-01".into(),
                boot: 1,
                seq,
                ts_ms: None,
                good,
                scrap: 0,
                state: Some(MachineState::Running),
                reason: None,
                order: None,
                metrics: BTreeMap::new(),
            };
            addr.send(ApplyThen(reading, Box::new(|_| {}))).await.expect("actor alive");
        }
        let s = addr.send(GetState).await.expect("actor alive");
        assert_eq!(s.good_total, 9);
        assert_eq!(s.cursor.map(|c| c.seq), Some(3));
    }

    /// Readings applied directly to the cell and through the actor change one state: the
    /// actor's answers and orders see what the ingest path applied, and the other way round.
    #[actix::test]
    async fn cell_and_actor_share_one_state() {
        let actor = WorkCenterActor::new(WorkCenterState::new("PRESS-1", "press-01"));
        let cell = actor.cell();
        let addr = actor.start();
        let reading = |seq, good, order: Option<&str>| Reading {
            device: "press-01".into(),
            boot: 1,
            seq,
            ts_ms: None,
            good,
            scrap: 1,
            state: Some(MachineState::Running),
            reason: None,
            order: order.map(String::from),
            metrics: BTreeMap::new(),
        };
        let first = cell.apply_then(&reading(1, 4, None), |o| o);
        assert!(matches!(&first, Outcome::Counted(d) if (d.good, d.scrap) == (4, 1)), "{first:?}");
        addr.send(ApplyThen(reading(2, 10, None), Box::new(|_| {}))).await.expect("actor alive");
        // Seen by the cell: a replay of seq 2 is a duplicate, seq 3 counts from 10.
        assert!(matches!(cell.apply_then(&reading(2, 10, None), |o| o), Outcome::Duplicate));
        addr.send(SetOrder(Some("PO-7".into()))).await.expect("actor alive");
        let third = cell.apply_then(&reading(3, 15, None), |o| o);
        assert!(
            matches!(&third, Outcome::Counted(d) if d.good == 5 && d.order.as_deref() == Some("PO-7")),
            "{third:?}"
        );
        let s = addr.send(GetState).await.expect("actor alive");
        assert_eq!((s.good_total, s.cursor.map(|c| c.seq), s.current_order.as_deref()), (15, Some(3), Some("PO-7")));
        assert_eq!(cell.snapshot().good_total, 15);
    }
}

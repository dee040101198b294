//! The MES domain: work centers, production orders and material buffers.
//!
//! Everything here is pure: state machines with explicit inputs and outputs, no clock
//! reads, no I/O, no SQL or HTTP types. The actix actors in [`actor`] are thin shells that
//! receive a message, call the pure function and reply with its outcome; the root crate
//! commits the outcome and only then acknowledges the input.

pub mod actor;
pub mod buffer;
pub mod clock;
pub mod counter;
pub mod ledger;
pub mod money;
pub mod oee;
pub mod order;
pub mod planning;
pub mod reading;
pub mod work_center;

pub use clock::{Clock, ManualClock, SystemClock};
pub use counter::{Advance, Cursor};
pub use money::Money;
pub use order::{OrderCommand, OrderStatus, TransitionError};
pub use reading::{MachineState, Reading, ReadingError};
pub use work_center::{Delta, Outcome, WorkCenterState};

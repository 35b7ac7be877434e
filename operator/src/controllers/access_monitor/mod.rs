//! AccessMonitor controller: the database pod's log read at every interval, its audit entries attributed and
//! recorded, the rules checked.

pub mod reconcile;
pub mod respond;
pub mod validate;

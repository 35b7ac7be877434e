//! AccessMonitor controller: the database pod's log read at every interval, its audit entries attributed and
//! recorded, the rows read sampled from the database's statistics, the rules checked; findings and incidents responded to, reported and alerted.

pub mod clients;
pub mod notify;
pub mod reconcile;
pub mod respond;
pub mod statistics;
pub mod validate;

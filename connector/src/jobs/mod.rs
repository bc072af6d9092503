//! Replication jobs and runs: the SMS model ([`model`]); more to come (the pure state
//! transition function, schedule planning, validation).

pub mod model;

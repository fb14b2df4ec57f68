//! barnraise-coordinator.

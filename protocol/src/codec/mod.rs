//! The update codec (being written).

//! The outer optimizer (being written).

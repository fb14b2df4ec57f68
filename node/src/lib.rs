//! barnraise-node.

//! barnraise-trainer.

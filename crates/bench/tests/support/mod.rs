//! Shared test support.

pub mod mini_server;

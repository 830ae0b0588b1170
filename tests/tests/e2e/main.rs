//! End-to-end scenarios: real proxies and nodes on 127.0.0.1 with temp dirs.
//! One test binary for the whole package keeps link times short.

mod auth;
mod bad_input;
mod chaos;
mod cli;
mod faults;
mod migrations;
mod rebalance;
mod rebalance_faults;
mod rows;
mod shutdown;
mod soak;
mod sql;

//! The shardlite proxy: it keeps a consistent-hash ring of shard nodes and routes every keyed
//! row operation to the node that owns the key; it runs migrations on every node and answers
//! the admin API. The `shardlite` binary (`src/main.rs`) only wires [`cli`] to a runtime.
//!
//! Modules, one idea each:
//! - [`server`]: configuration, shared state, the router and the serve loop.
//! - [`routing`]: the data plane, `/v1/tables/...` and `/v1/sql`, routed by key.
//! - [`admin`]: the admin plane under `/v1/cluster`: membership, status, verify, migrations.
//! - [`cluster`]: membership and epoch in the state file; the immutable [`cluster::Topology`]
//!   (with its ring) that requests read without locking.
//! - [`upstream`]: the pooled HTTP client to nodes, with connect and request timeouts.
//! - [`health`]: background health checks; a down node's keys get 503 at once.
//! - [`schema`]: the cached table schema (key column and affinity) of the shards.
//! - [`migrate`]: migration sets, their checks, and the fan-out to nodes.
//! - [`rebalance`]: the online rebalance: plan (ring diff, counted rows), copy, catch-up, fence,
//!   switch, clean-up; resumable from its record in the state file.
//! - [`job`]: one long job (migration or rebalance) at a time.
//! - [`auth`]: bearer tokens for the data and admin APIs.
//! - [`body`]: JSON request bodies with size limits and JSON errors.
//! - [`error`]: the one error type and its mapping to HTTP statuses.
//! - [`cli`] and [`dev`]: the command-line tool and the one-process local cluster.

pub mod admin;
pub mod auth;
pub mod body;
pub mod cli;
pub mod cluster;
pub mod dev;
pub mod error;
pub mod health;
pub mod job;
pub mod migrate;
pub mod rebalance;
pub mod routing;
pub mod schema;
pub mod server;
pub mod upstream;

pub use server::{ProxyConfig, ProxyState, router, serve};

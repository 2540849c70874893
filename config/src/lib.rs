//! The one configuration file of a cluster, shared by the message server
//! and every node.
//!
//! Every key is optional; each default is a named constant (`DEFAULT_*`).
//! A node reads the common sections, then its own `[nodes.<id>]` section,
//! which may override any key of any section:
//!
//! ```toml
//! [cluster]
//! name = "shop"
//!
//! [lazy]
//! threshold_bytes = 65536
//!
//! [nodes.server-1.lazy]
//! threshold_bytes = 1048576
//! ```
//!
//! A bad file or value is an error at start-up that names the key.
//!
//! This crate sits on `transports`: validation checks the limits against
//! the wire's ([`transports::frame::MAX_HEADER_BYTES`]), and `[tcp]` turns
//! into the socket layer's [`transports::tcp::TcpOptions`]
//! ([`TcpConfig::options`]). `transports` knows nothing of the
//! configuration.
//!
//! # Layout
//!
//! - `defaults`: the `DEFAULT_*` constants the keys' docs cite.
//! - `sections`: [`Config`] and its sections, one struct per table
//!   (`[cluster]`, `[message_server]`, `[node]`, `[lazy]`, `[limits]`,
//!   `[tcp]`, `[monitor]`, ...), with their defaults.
//! - `load`: reading a file, per-node overrides, environment overrides.
//! - `validate`: range and consistency checks.
//! - [`interfaces`]: network interfaces named in the config, resolved to
//!   their addresses at start.
//! - [`permissions`]: what each node may subscribe, join and send to.
//! - `error`: [`ConfigError`], naming the file and the key.

mod defaults;
mod error;
pub mod interfaces;
mod load;
pub mod permissions;
mod sections;
mod validate;

pub use defaults::*;
pub use error::ConfigError;
pub use permissions::{PermissionsConfig, PermissionsTable};
pub use sections::{
    ClusterConfig, Config, LazyConfig, LimitsConfig, MessageServerConfig, MonitorConfig,
    NodeConfig, ServiceConfig, StoreOnDamage, TcpConfig, TlsConfig,
};

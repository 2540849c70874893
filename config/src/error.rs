//! The configuration's error: which file, which key, what is wrong.

/// An error in the configuration, naming the file and the key.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the
    /// wrong type; the source names the key and line.
    #[error("invalid config in {origin}: {source}")]
    Parse {
        /// The file, and the node section if the error is in one.
        origin: String,
        /// The parser's error, which quotes the offending line.
        #[source]
        source: toml::de::Error,
    },
    /// A network interface named by a key cannot be used on this host.
    #[error("`{key}`: {reason}")]
    Interface {
        /// The key naming the interface.
        key: String,
        /// What is wrong: the interface is missing or has no address, and
        /// which interfaces the host has.
        reason: String,
    },
    /// A value is out of range or inconsistent with another.
    #[error("invalid config value for `{key}`: {reason}")]
    Invalid {
        /// The key, as `section.key` (prefixed by `nodes.<id>.` in a node
        /// section).
        key: String,
        /// What is wrong with it.
        reason: String,
    },
}

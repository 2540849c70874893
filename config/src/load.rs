//! Reading a config file, merging a node's `[nodes.<id>]` section over the
//! common ones, and the environment overrides.

use std::path::Path;

use crate::{Config, ConfigError};

impl Config {
    /// Reads and validates a config file, node sections included.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the file and the bad key.
    pub fn load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names it in errors.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] naming the bad key.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|source| ConfigError::Parse {
            origin: origin.to_owned(),
            source,
        })?;
        config.validate("")?;
        for id in config.nodes.keys() {
            config.for_node(id)?;
        }
        Ok(config)
    }

    /// The configuration as node `id` sees it: the common sections with its
    /// `[nodes.<id>]` section merged over them.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if the merged result is invalid, naming the key under
    /// `nodes.<id>`.
    pub fn for_node(&self, id: &str) -> Result<Config, ConfigError> {
        let Some(overrides) = self.nodes.get(id) else {
            let mut config = self.clone();
            config.nodes.clear();
            return Ok(config);
        };
        let mut base = self.clone();
        base.nodes.clear();
        let origin = format!("[nodes.{id}]");
        let mut table = toml::Table::try_from(&base).map_err(|e| ConfigError::Invalid {
            key: format!("nodes.{id}"),
            reason: e.to_string(),
        })?;
        merge(&mut table, overrides);
        let text = toml::to_string(&table).map_err(|e| ConfigError::Invalid {
            key: format!("nodes.{id}"),
            reason: e.to_string(),
        })?;
        let merged: Config =
            toml::from_str(&text).map_err(|source| ConfigError::Parse { origin, source })?;
        merged.validate(&format!("nodes.{id}."))?;
        Ok(merged)
    }

    /// Applies the environment overrides for the common keys, reading each
    /// variable through `var`:
    ///
    /// | variable | key |
    /// | --- | --- |
    /// | `CLUSTERCOMM_CLUSTER` | `cluster.name` |
    /// | `CLUSTERCOMM_MESSAGE_SERVER` | `message_server.addresses` (comma-separated) |
    /// | `CLUSTERCOMM_LISTEN` | `message_server.listen` |
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] naming the variable if its value is bad.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(name) = var("CLUSTERCOMM_CLUSTER") {
            self.cluster.name = name;
        }
        if let Some(addrs) = var("CLUSTERCOMM_MESSAGE_SERVER") {
            self.message_server.addresses = addrs
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
        }
        if let Some(listen) = var("CLUSTERCOMM_LISTEN") {
            self.message_server.listen = listen.parse().map_err(|e| ConfigError::Invalid {
                key: "CLUSTERCOMM_LISTEN".to_owned(),
                reason: format!("{listen:?} is not a socket address: {e}"),
            })?;
        }
        self.validate("")
    }
}

/// Merges `over` into `base`, table by table; values of `over` win.
fn merge(base: &mut toml::Table, over: &toml::Table) {
    for (key, value) in over {
        match (base.get_mut(key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            _ => {
                base.insert(key.clone(), value.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::defaults::DEFAULT_LAZY_THRESHOLD_BYTES;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", "test").expect("empty config is valid");
        assert_eq!(c, Config::default());
        assert_eq!(c.lazy.threshold_bytes, DEFAULT_LAZY_THRESHOLD_BYTES);
    }

    #[test]
    fn unknown_key_is_named() {
        let err =
            Config::parse("[lazy]\nthreshhold_bytes = 5\n", "test.toml").expect_err("unknown key");
        let text = format!("{err}");
        assert!(text.contains("threshhold_bytes"), "{text}");
        assert!(text.contains("test.toml"), "{text}");
    }

    #[test]
    fn a_service_takes_its_priority_and_a_bad_one_is_named() {
        use transports::protocol::Priority;
        let c = Config::parse(
            "[services.cache-invalidation]\npriority = \"express\"\n[services.audit]\npriority = \"low\"\n",
            "t",
        )
        .expect("valid");
        assert_eq!(c.service_priority("cache-invalidation"), Priority::Express);
        assert_eq!(c.service_priority("audit"), Priority::Low);
        assert_eq!(c.service_priority("other"), Priority::Normal);
        let err = Config::parse("[services.audit]\npriority = \"urgent\"\n", "t.toml")
            .expect_err("no such priority");
        let text = format!("{err}");
        assert!(
            text.contains("priority") && text.contains("urgent"),
            "{text}"
        );
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::parse("[node]\nsend_timeout_ms = \"soon\"\n", "t").expect_err("type");
        let text = format!("{err}");
        assert!(text.contains("send_timeout_ms"), "{text}");
    }

    #[test]
    fn node_sections_override_and_are_validated() {
        let text =
            "[lazy]\nthreshold_bytes = 1000\n[nodes.server-1.lazy]\nthreshold_bytes = 2000\n";
        let c = Config::parse(text, "t").expect("valid");
        assert_eq!(
            c.for_node("server-1").expect("merge").lazy.threshold_bytes,
            2000
        );
        assert_eq!(
            c.for_node("server-2").expect("merge").lazy.threshold_bytes,
            1000
        );

        let bad = "[nodes.server-1.node]\nbusy_lower = 5000\n";
        match Config::parse(bad, "t") {
            Err(ConfigError::Invalid { key, .. }) => {
                assert_eq!(key, "nodes.server-1.node.busy_lower")
            }
            other => panic!("expected an error, got {other:?}"),
        }
        let unknown = "[nodes.server-1.lazy]\nbogus = 1\n";
        let err = Config::parse(unknown, "t").expect_err("unknown key in node section");
        let text = format!("{err}");
        assert!(
            text.contains("bogus") && text.contains("nodes.server-1"),
            "{text}"
        );
    }

    #[test]
    fn env_overrides() {
        let mut c = Config::default();
        c.apply_env(|k| match k {
            "CLUSTERCOMM_MESSAGE_SERVER" => Some("10.0.0.1:1, 10.0.0.2:2".into()),
            "CLUSTERCOMM_CLUSTER" => Some("shop".into()),
            _ => None,
        })
        .expect("valid");
        assert_eq!(c.message_server.addresses, ["10.0.0.1:1", "10.0.0.2:2"]);
        assert_eq!(c.cluster.name, "shop");
        let err = c
            .apply_env(|k| (k == "CLUSTERCOMM_LISTEN").then(|| "nope".into()))
            .expect_err("bad listen");
        assert!(format!("{err}").contains("CLUSTERCOMM_LISTEN"));
    }
}

//! A cluster's certificates for `[tls]`: a CA, the message server's
//! certificate (naming `tls.server_name`) and one per node (naming its
//! node id), each good for both ends of a connection.
//!
//! The files written to the output directory:
//!
//! | file | what |
//! | --- | --- |
//! | `ca.pem` | the CA certificate: every process's `tls.ca_file` |
//! | `ca.key` | the CA's private key: keep it offline |
//! | `<name>.pem`, `<name>.key` | a certificate and its key, for the server name and each node id |
//!
//! Keys are written readable by their owner only (mode 0600 on Unix).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// Why the certificates could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CertsError {
    /// A name cannot go into a certificate (a node id must be a DNS name:
    /// letters, digits, `-` and `.`).
    #[error("{0:?} cannot be a certificate's name: use letters, digits, '-' and '.'")]
    BadName(String),
    /// The same name twice.
    #[error("{0:?} is named twice")]
    Duplicate(String),
    /// rcgen could not make a key or a certificate.
    #[error("making a certificate: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// What was written, to say so.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// The CA certificate.
    pub ca: PathBuf,
    /// Each name with its certificate and key files.
    pub issued: Vec<(String, PathBuf, PathBuf)>,
}

fn valid(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// Makes a CA and a certificate for each of `names` (the message server's
/// name and the node ids) in `dir`, which is created if missing.
///
/// # Errors
///
/// [`CertsError`]: a name that cannot be a certificate's, a duplicate, or
/// a file that cannot be written.
pub fn generate(dir: &Path, cluster: &str, names: &[String]) -> Result<Written, CertsError> {
    let mut seen = std::collections::HashSet::new();
    for name in names {
        if !valid(name) {
            return Err(CertsError::BadName(name.clone()));
        }
        if !seen.insert(name.as_str()) {
            return Err(CertsError::Duplicate(name.clone()));
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| CertsError::Write {
        path: dir.to_owned(),
        source,
    })?;
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{cluster} cluster CA"));
    ca_params.distinguished_name = dn;
    let ca = ca_params.self_signed(&ca_key)?;
    let ca_file = dir.join("ca.pem");
    write(&ca_file, &ca.pem(), false)?;
    write(&dir.join("ca.key"), &ca_key.serialize_pem(), true)?;
    let mut issued = Vec::new();
    for name in names {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec![name.clone()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name.clone());
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        let cert_file = dir.join(format!("{name}.pem"));
        let key_file = dir.join(format!("{name}.key"));
        write(&cert_file, &cert.pem(), false)?;
        write(&key_file, &key.serialize_pem(), true)?;
        issued.push((name.clone(), cert_file, key_file));
    }
    Ok(Written {
        ca: ca_file,
        issued,
    })
}

fn write(path: &Path, text: &str, secret: bool) -> Result<(), CertsError> {
    let failed = |source| CertsError::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = secret;
    let mut file = options.open(path).map_err(failed)?;
    // The mode above applies only to a new file: one written over keeps
    // its own, so a key's is set here too.
    #[cfg(unix)]
    if secret {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(failed)?;
    }
    std::io::Write::write_all(&mut file, text.as_bytes()).map_err(failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_must_fit_a_certificate() {
        for good in ["a", "server-1", "web.eu-1", "message-server"] {
            assert!(valid(good), "{good}");
        }
        for bad in ["", "under_score", "-lead", "trail-", "a..b", "sp ace", "é"] {
            assert!(!valid(bad), "{bad}");
        }
    }

    #[test]
    fn writes_a_ca_and_one_pair_per_name() {
        let dir = std::env::temp_dir().join(format!("clustercomm-certs-{}", std::process::id()));
        let names = vec!["message-server".to_owned(), "a".to_owned()];
        // A key written over keeps no looser mode than a new one.
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("a.key"), "old").expect("old key");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.join("a.key"), std::fs::Permissions::from_mode(0o644))
                .expect("mode");
        }
        let written = generate(&dir, "test", &names).expect("generate");
        assert_eq!(written.issued.len(), 2);
        for (_, cert, key) in &written.issued {
            assert!(std::fs::read_to_string(cert)
                .expect("cert")
                .contains("BEGIN CERTIFICATE"));
            assert!(std::fs::read_to_string(key)
                .expect("key")
                .contains("PRIVATE KEY"));
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(key).expect("meta").permissions().mode();
                assert_eq!(mode & 0o077, 0, "a key readable by others");
            }
        }
        let twice = vec!["a".to_owned(), "a".to_owned()];
        assert!(matches!(
            generate(&dir, "test", &twice),
            Err(CertsError::Duplicate(_))
        ));
        let bad = vec!["a_b".to_owned()];
        assert!(matches!(
            generate(&dir, "test", &bad),
            Err(CertsError::BadName(_))
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

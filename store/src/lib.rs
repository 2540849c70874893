//! clustercomm's durable store: what a node must not lose in a crash (the
//! recoverable messages it sends until they are acknowledged, those it
//! received until its application has them, and the numbers that keep
//! each delivered once).
//!
//! - **The file.** One redb database, `store.redb` in the configured
//!   directory, with one table of records. Every record is framed with a
//!   magic, its length and a CRC-32C, and checked whenever it is read.
//! - **Durability.** A [`Store::commit`] returns once its changes are
//!   fsynced. One thread writes: it takes every commit waiting and writes
//!   them in one transaction, so many writers share one flush (group
//!   commit).
//! - **Damage.** At open, redb checks the file's integrity and every
//!   record is checked against its checksum. A damaged file is refused
//!   with [`StoreError::Damaged`], or salvaged ([`OnDamage::Salvage`]):
//!   every intact record is kept, and what could not be read is reported
//!   by offset ([`Damage`]).
//! - **Marks.** Numbers that only rise ([`Mark`]): writing a lower value
//!   changes nothing. A salvage may find old copies of records in the
//!   file's free space; the marks say which of them are done (an outgoing
//!   message at or below its receiver's `Acked` mark, an incoming one at or
//!   below its sender's `Handed` mark) and those are not kept.

mod contents;
mod record;
mod salvage;
mod store;

use std::path::PathBuf;

pub use contents::Contents;
pub use record::{
    DeadLetterRecord, Incoming, Mark, MarkKind, Outgoing, Record, RecordError, RecordKey,
    StoredRetry,
};
pub use salvage::{Damage, Unreadable};
pub use store::{Change, OnDamage, Opened, Queued, Store, FILE_NAME};

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The directory or file could not be made, read or moved.
    #[error("store {path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The file is damaged, and the store is configured to refuse it.
    #[error("store {path} is damaged ({detail}); set on_damage = \"salvage\" to keep what is intact, or move the file aside")]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A write failed; the store refuses every write after it.
    #[error("store {path}: a write failed: {detail}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What failed.
        detail: String,
    },
    /// Another store has the file open (in this process or another).
    #[error("store {path} is in use by another node or process")]
    InUse {
        /// The file.
        path: PathBuf,
    },
    /// The queue of commits is full (only [`Store::commit_later`] says so).
    #[error("the store's queue of commits is full")]
    Busy,
    /// The store was closed.
    #[error("the store is closed")]
    Closed,
}

impl Clone for StoreError {
    fn clone(&self) -> Self {
        match self {
            StoreError::Io { path, source } => StoreError::Io {
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            StoreError::Damaged { path, detail } => StoreError::Damaged {
                path: path.clone(),
                detail: detail.clone(),
            },
            StoreError::Write { path, detail } => StoreError::Write {
                path: path.clone(),
                detail: detail.clone(),
            },
            StoreError::InUse { path } => StoreError::InUse { path: path.clone() },
            StoreError::Busy => StoreError::Busy,
            StoreError::Closed => StoreError::Closed,
        }
    }
}

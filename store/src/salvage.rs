//! Salvage of a damaged store: every record framed in the file is looked
//! for by its magic and checked by its checksum; what is intact goes into
//! a new file, the damaged one is kept beside it, and what could not be
//! read is reported, each by its offset.

use std::path::{Path, PathBuf};

use crate::record::{unframe, RecordError, MAGIC};
use crate::store::{apply, Change};
use crate::{Contents, StoreError};

/// Unreadable places listed in a [`Damage`], at most (the rest are
/// counted).
const LISTED: usize = 1000;

/// What a salvage found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Damage {
    /// Why the file could not be opened as it was.
    pub detail: String,
    /// Where the damaged file was moved.
    pub moved_to: PathBuf,
    /// Intact records found (all versions; what is current of them is
    /// kept).
    pub intact: usize,
    /// Records kept in the new file.
    pub kept: usize,
    /// Places where a record began and could not be read, in file order
    /// (the first [`LISTED`]).
    pub unreadable: Vec<Unreadable>,
    /// How many places could not be read in all.
    pub unreadable_count: usize,
}

/// A place in a damaged file where a record began and could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable {
    /// Its offset in the file.
    pub offset: u64,
    /// Why.
    pub error: RecordError,
}

impl std::fmt::Display for Damage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}; kept {} records ({} intact copies found), {} unreadable",
            self.detail, self.kept, self.intact, self.unreadable_count
        )?;
        for u in &self.unreadable {
            write!(f, "; at byte {}: {}", u.offset, u.error)?;
        }
        write!(f, "; the damaged file is {}", self.moved_to.display())
    }
}

/// Salvages the damaged store at `path` (see the module docs).
pub(crate) fn salvage(
    path: &Path,
    detail: String,
) -> Result<(redb::Database, Contents, Damage), StoreError> {
    let io = |source| StoreError::Io {
        path: path.to_owned(),
        source,
    };
    let bytes = std::fs::read(path).map_err(io)?;
    let (records, unreadable, unreadable_count) = scan(&bytes);
    let intact = records.len();
    let contents = Contents::from_records(records);
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default();
    let moved_to = path.with_extension(format!("redb.damaged-{secs}"));
    std::fs::rename(path, &moved_to).map_err(io)?;
    let db = redb::Database::create(path).map_err(|e| StoreError::Write {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    let changes: Vec<Change> = contents.records().into_iter().map(Change::Put).collect();
    let kept = changes.len();
    apply(&db, &changes).map_err(|detail| StoreError::Write {
        path: path.to_owned(),
        detail,
    })?;
    let damage = Damage {
        detail,
        moved_to,
        intact,
        kept,
        unreadable,
        unreadable_count,
    };
    tracing::warn!(path = %path.display(), %damage, "the store was damaged and salvaged");
    Ok((db, contents, damage))
}

/// Every intact record framed in `bytes`, and where a record began and
/// could not be read. A record found intact is skipped whole: bytes inside
/// it (a body that holds a framed record) are not looked at.
fn scan(bytes: &[u8]) -> (Vec<crate::Record>, Vec<Unreadable>, usize) {
    let mut records = Vec::new();
    let mut unreadable = Vec::new();
    let mut count = 0;
    let mut at = 0;
    while let Some(found) = find(&bytes[at..], &MAGIC) {
        let start = at + found;
        match unframe(&bytes[start..]) {
            Ok((record, len)) => {
                records.push(record);
                at = start + len;
            }
            Err(error) => {
                count += 1;
                if unreadable.len() < LISTED {
                    unreadable.push(Unreadable {
                        offset: start as u64,
                        error,
                    });
                }
                at = start + 1;
            }
        }
    }
    (records, unreadable, count)
}

/// Where `needle` first occurs in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

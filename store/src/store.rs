//! [`Store`]: the records in one redb file, written by one thread that
//! commits whatever is waiting in one durable (fsynced) transaction: many
//! writers share one flush (group commit).

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use redb::{Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::{mpsc, oneshot};

use crate::record::{frame, unframe, Mark, MarkKind, Record, RecordKey};
use crate::salvage::{salvage, Damage};
use crate::{Contents, StoreError};

/// The one table: encoded [`RecordKey`] to framed [`Record`].
const RECORDS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("records");

/// The store's file in its directory.
pub const FILE_NAME: &str = "store.redb";

/// Commits waiting for the writer thread, at most.
const QUEUED_COMMITS: usize = 4096;

/// Commits the writer thread takes into one transaction, at most.
const BATCH: usize = 1024;

/// What to do with a store found damaged at start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum OnDamage {
    /// Refuse to open it, with an error that says what is wrong (the
    /// default: nothing is decided for the operator).
    #[default]
    Refuse,
    /// Move the damaged file aside, keep every record that is still
    /// intact in a new file, and report what could not be read.
    Salvage,
}

/// One change a commit makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Write a record (a [`Mark`] only if it raises the stored one).
    Put(Record),
    /// Remove the record with this key, if there is one.
    Remove(RecordKey),
}

/// A commit waiting for the writer thread.
struct Job {
    changes: Vec<Change>,
    done: Option<oneshot::Sender<Result<(), StoreError>>>,
}

impl Job {
    /// Whether it must be on disk before it is answered (only
    /// [`Store::commit_later`]'s jobs need not: they are written without
    /// an fsync, and reach the disk with the next commit that has one).
    fn durable(&self) -> bool {
        self.done.is_some()
    }
}

/// Counts kept by the writer thread.
#[derive(Debug, Default)]
struct Stats {
    transactions: AtomicU64,
    commits: AtomicU64,
}

/// The store: open it once per process and directory, then clone it
/// freely. Every commit is durable when it returns `Ok`.
#[derive(Clone, Debug)]
pub struct Store {
    jobs: mpsc::Sender<Job>,
    /// For reads; the writer thread writes through its own reference.
    db: Arc<redb::Database>,
    stats: Arc<Stats>,
    path: Arc<PathBuf>,
    /// Fires when the writer thread has ended and the file is closed.
    closed: Arc<tokio::sync::Mutex<Option<oneshot::Receiver<()>>>>,
}

/// Changes queued for a commit (see [`Store::queue`]).
#[derive(Debug)]
#[must_use = "a queued commit is only known durable once awaited"]
pub struct Queued(Option<oneshot::Receiver<Result<(), StoreError>>>);

impl Queued {
    /// Waits until the changes are on disk.
    ///
    /// # Errors
    ///
    /// As [`Store::commit`].
    pub async fn durable(self) -> Result<(), StoreError> {
        match self.0 {
            Some(rx) => rx.await.map_err(|_| StoreError::Closed)?,
            None => Err(StoreError::Closed),
        }
    }
}

/// A store just opened: the store, what it holds, and what was damaged.
#[derive(Debug)]
pub struct Opened {
    /// The store.
    pub store: Store,
    /// What it holds.
    pub contents: Contents,
    /// What a salvage could not keep, if the file was damaged.
    pub damage: Option<Damage>,
}

impl Store {
    /// Opens (or makes) the store in `dir`, and reads all it holds. A
    /// damaged file is refused or salvaged as `on_damage` says. Blocking:
    /// call it before the runtime starts or from `spawn_blocking`.
    ///
    /// # Errors
    ///
    /// The directory or file cannot be made or read; the file is damaged
    /// and `on_damage` is [`OnDamage::Refuse`].
    pub fn open(dir: &Path, on_damage: OnDamage) -> Result<Opened, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(FILE_NAME);
        let (db, contents, damage) = match open_checked(&path) {
            Ok((db, contents)) => (db, contents, None),
            Err(Damaged::Not(e)) => return Err(e),
            Err(Damaged::Is(detail)) => match on_damage {
                OnDamage::Refuse => return Err(StoreError::Damaged { path, detail }),
                OnDamage::Salvage => {
                    let (db, contents, damage) = salvage(&path, detail)?;
                    (db, contents, Some(damage))
                }
            },
        };
        let (db, contents) = with_epoch(db, contents, &path)?;
        let db = Arc::new(db);
        let reader = db.clone();
        let (jobs, rx) = mpsc::channel(QUEUED_COMMITS);
        let stats = Arc::new(Stats::default());
        let (closed_tx, closed_rx) = oneshot::channel();
        let thread_stats = stats.clone();
        let thread_path = path.clone();
        std::thread::Builder::new()
            .name("clustercomm-store".into())
            .spawn(move || {
                write_loop(&db, &thread_path, rx, &thread_stats);
                drop(db);
                let _ = closed_tx.send(());
            })
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                source,
            })?;
        Ok(Opened {
            store: Store {
                jobs,
                db: reader,
                stats,
                path: Arc::new(path),
                closed: Arc::new(tokio::sync::Mutex::new(Some(closed_rx))),
            },
            contents,
            damage,
        })
    }

    /// Makes `changes` durable, together with whatever other commits are
    /// waiting: returns once they are on disk (fsynced).
    ///
    /// # Errors
    ///
    /// The store failed (it refuses every commit after its first failure)
    /// or is closed.
    pub async fn commit(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        let (done, rx) = oneshot::channel();
        let job = Job {
            changes,
            done: Some(done),
        };
        self.jobs.send(job).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Queues `changes` for the next commit, and returns once they are
    /// queued: commits queued one after another are committed in that
    /// order. [`Queued::durable`] waits until they are on disk.
    pub async fn queue(&self, changes: Vec<Change>) -> Queued {
        let (done, rx) = oneshot::channel();
        let job = Job {
            changes,
            done: Some(done),
        };
        match self.jobs.send(job).await {
            Ok(()) => Queued(Some(rx)),
            Err(_) => Queued(None),
        }
    }

    /// Queues `changes` for the next commit without waiting for it, and
    /// without an fsync of their own: they reach the disk with the next
    /// commit that has one. For changes whose loss in a crash costs only a
    /// repeat (a removal).
    ///
    /// # Errors
    ///
    /// The queue of commits is full, or the store is closed.
    pub fn commit_later(&self, changes: Vec<Change>) -> Result<(), StoreError> {
        let job = Job {
            changes,
            done: None,
        };
        self.jobs.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => StoreError::Busy,
            mpsc::error::TrySendError::Closed(_) => StoreError::Closed,
        })
    }

    /// The records under `keys`, as committed (`None` where there is none,
    /// or where a record no longer reads back whole: that is logged).
    /// Blocking: call it from `spawn_blocking`.
    ///
    /// # Errors
    ///
    /// The file cannot be read.
    pub fn read(&self, keys: &[RecordKey]) -> Result<Vec<Option<Record>>, StoreError> {
        let failed = |detail: String| StoreError::Write {
            path: self.path.to_path_buf(),
            detail: format!("reading: {detail}"),
        };
        let txn = self.db.begin_read().map_err(|e| failed(e.to_string()))?;
        let table = match txn.open_table(RECORDS) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(vec![None; keys.len()]),
            Err(e) => return Err(failed(e.to_string())),
        };
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let value = table
                .get(key.encode().as_slice())
                .map_err(|e| failed(e.to_string()))?;
            let record = match value.map(|v| unframe(v.value())) {
                None => None,
                Some(Ok((record, _))) => Some(record),
                Some(Err(e)) => {
                    tracing::error!(path = %self.path.display(), ?key, error = %e, "a stored record no longer reads back whole");
                    None
                }
            };
            out.push(record);
        }
        Ok(out)
    }

    /// Where the store's file is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Transactions written so far (each one fsync, but those made only of
    /// [`Store::commit_later`]'s changes).
    pub fn transactions(&self) -> u64 {
        self.stats.transactions.load(Ordering::Relaxed)
    }

    /// Commits made so far (several share a transaction).
    pub fn commits(&self) -> u64 {
        self.stats.commits.load(Ordering::Relaxed)
    }

    /// Closes the store once every clone is dropped, and waits until its
    /// file is closed (what was committed stays committed).
    pub async fn close(self) {
        let closed = self.closed.clone();
        drop(self);
        let rx = closed.lock().await.take();
        if let Some(rx) = rx {
            let _ = rx.await;
        }
    }
}

/// Why a file could not be opened as it is.
pub(crate) enum Damaged {
    /// It is damaged: what is wrong.
    Is(String),
    /// It could not be opened for another reason.
    Not(StoreError),
}

/// Opens `path` with redb's integrity check and reads every record,
/// checking each; any failure is damage.
fn open_checked(path: &Path) -> Result<(redb::Database, Contents), Damaged> {
    let opened = catch_unwind(AssertUnwindSafe(|| {
        let mut builder = redb::Builder::new();
        builder.set_check_integrity_on_open(true);
        builder.create(path)
    }));
    let db = match opened {
        Ok(Ok(db)) => db,
        // Not damage: the file is in use, or cannot be read at all.
        Ok(Err(
            redb::DatabaseError::DatabaseAlreadyOpen | redb::DatabaseError::LockProtocolMismatch,
        )) => {
            return Err(Damaged::Not(StoreError::InUse {
                path: path.to_owned(),
            }))
        }
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Io(e))))
            if e.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            return Err(Damaged::Not(StoreError::Io {
                path: path.to_owned(),
                source: e,
            }))
        }
        Ok(Err(e)) => return Err(Damaged::Is(format!("redb refused the file: {e}"))),
        Err(_) => return Err(Damaged::Is("redb panicked opening the file".into())),
    };
    let read = catch_unwind(AssertUnwindSafe(|| read_all(&db)));
    match read {
        Ok(Ok(contents)) => Ok((db, contents)),
        Ok(Err(detail)) => Err(Damaged::Is(detail)),
        Err(_) => Err(Damaged::Is("redb panicked reading the file".into())),
    }
}

/// Every record in `db`, each checked against its frame and its key.
fn read_all(db: &redb::Database) -> Result<Contents, String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let table = match txn.open_table(RECORDS) {
        Ok(table) => table,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Contents::default()),
        Err(e) => return Err(e.to_string()),
    };
    let mut records = Vec::new();
    for entry in table.iter().map_err(|e| e.to_string())? {
        let (key, value) = entry.map_err(|e| e.to_string())?;
        let (record, _) = unframe(value.value())
            .map_err(|e| format!("a record under key {:?}: {e}", key.value()))?;
        if record.key().encode() != key.value() {
            return Err(format!(
                "a record under key {:?} names another key",
                key.value()
            ));
        }
        records.push(record);
    }
    Ok(Contents::from_records(records))
}

/// Draws this store's epoch if it has none yet.
fn with_epoch(
    db: redb::Database,
    mut contents: Contents,
    path: &Path,
) -> Result<(redb::Database, Contents), StoreError> {
    if contents.epoch != 0 {
        return Ok((db, contents));
    }
    let epoch = draw_epoch();
    let mark = Record::Mark(Mark {
        kind: MarkKind::Epoch,
        node: String::new(),
        epoch: 0,
        value: epoch,
    });
    apply(&db, &[Change::Put(mark)]).map_err(|detail| StoreError::Write {
        path: path.to_owned(),
        detail,
    })?;
    contents.epoch = epoch;
    Ok((db, contents))
}

/// A random non-zero number from the standard library's hasher seeds and
/// the clock.
fn draw_epoch() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    hasher.write_u128(now);
    hasher.write_u32(std::process::id());
    hasher.finish().max(1)
}

/// Writes `changes` in one durable transaction.
pub(crate) fn apply(db: &redb::Database, changes: &[Change]) -> Result<(), String> {
    apply_with(db, changes, Durability::Immediate)
}

/// Writes `changes` in one transaction of `durability`.
fn apply_with(
    db: &redb::Database,
    changes: &[Change],
    durability: Durability,
) -> Result<(), String> {
    let mut txn = db.begin_write().map_err(|e| e.to_string())?;
    txn.set_durability(durability).map_err(|e| e.to_string())?;
    {
        let mut table = txn.open_table(RECORDS).map_err(|e| e.to_string())?;
        for change in changes {
            match change {
                Change::Put(record) => {
                    let key = record.key().encode();
                    if let Record::Mark(mark) = record {
                        let stored = table
                            .get(key.as_slice())
                            .map_err(|e| e.to_string())?
                            .and_then(|v| unframe(v.value()).ok());
                        if let Some((Record::Mark(old), _)) = stored {
                            if old.value >= mark.value {
                                continue;
                            }
                        }
                    }
                    table
                        .insert(key.as_slice(), frame(record).as_slice())
                        .map_err(|e| e.to_string())?;
                }
                Change::Remove(key) => {
                    table
                        .remove(key.encode().as_slice())
                        .map_err(|e| e.to_string())?;
                }
            }
        }
    }
    txn.commit().map_err(|e| e.to_string())
}

/// The writer thread: one transaction for whatever waits, then every
/// waiter is told. After a failure every commit fails.
fn write_loop(db: &redb::Database, path: &Path, mut rx: mpsc::Receiver<Job>, stats: &Stats) {
    let mut failed: Option<String> = None;
    let mut batch: Vec<Job> = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        batch.push(first);
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let result = match &failed {
            Some(detail) => Err(detail.clone()),
            None => {
                // Moved out, not copied: the jobs only wait for the answer.
                let changes = coalesce_marks(
                    batch
                        .iter_mut()
                        .flat_map(|j| std::mem::take(&mut j.changes)),
                );
                let durability = if batch.iter().any(Job::durable) {
                    Durability::Immediate
                } else {
                    Durability::None
                };
                let applied =
                    catch_unwind(AssertUnwindSafe(|| apply_with(db, &changes, durability)))
                        .unwrap_or_else(|_| Err("redb panicked writing".into()));
                stats.transactions.fetch_add(1, Ordering::Relaxed);
                if let Err(detail) = &applied {
                    tracing::error!(path = %path.display(), detail, "the store failed a write; it refuses every write from now on");
                    failed = Some(detail.clone());
                }
                applied
            }
        };
        stats
            .commits
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        for job in batch.drain(..) {
            if let Some(done) = job.done {
                let _ = done.send(result.clone().map_err(|detail| StoreError::Write {
                    path: path.to_owned(),
                    detail,
                }));
            }
        }
    }
}

/// `changes` with each mark written once, at its highest value (marks
/// only rise: the rest would be compared and dropped one by one), after
/// the other changes, which keep their order.
fn coalesce_marks(changes: impl Iterator<Item = Change>) -> Vec<Change> {
    let mut out = Vec::new();
    let mut marks: HashMap<(MarkKind, String, u64), Mark> = HashMap::new();
    for change in changes {
        match change {
            Change::Put(Record::Mark(mark)) => {
                let key = (mark.kind, mark.node.clone(), mark.epoch);
                match marks.get_mut(&key) {
                    Some(kept) if kept.value >= mark.value => {}
                    Some(kept) => *kept = mark,
                    None => {
                        marks.insert(key, mark);
                    }
                }
            }
            other => out.push(other),
        }
    }
    out.extend(marks.into_values().map(|m| Change::Put(Record::Mark(m))));
    out
}

/// Keeps, of records read in any order and possibly in several versions,
/// what is current (see [`Contents::from_records`]).
pub(crate) fn latest(records: Vec<Record>) -> BTreeMap<RecordKey, Record> {
    let mut map: BTreeMap<RecordKey, Record> = BTreeMap::new();
    for record in records {
        let key = record.key();
        match (map.get(&key), &record) {
            (Some(Record::Mark(old)), Record::Mark(new)) if old.value >= new.value => {}
            _ => {
                map.insert(key, record);
            }
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(node: &str, value: u64) -> Change {
        Change::Put(Record::Mark(Mark {
            kind: MarkKind::Received,
            node: node.into(),
            epoch: 1,
            value,
        }))
    }

    #[test]
    fn a_batch_writes_each_mark_once_at_its_highest() {
        let remove = Change::Remove(RecordKey::Outgoing("b".into(), 3));
        let changes = vec![
            mark("a", 5),
            remove.clone(),
            mark("a", 7),
            mark("b", 2),
            mark("a", 6),
        ];
        let mut out = coalesce_marks(changes.into_iter());
        assert_eq!(out.remove(0), remove, "other changes first, in order");
        out.sort_by_key(|c| match c {
            Change::Put(Record::Mark(m)) => m.node.clone(),
            _ => String::new(),
        });
        assert_eq!(out, vec![mark("a", 7), mark("b", 2)]);
    }
}

//! The store on disk: commits survive a reopen, many commits share a
//! transaction, and a damaged file is refused or salvaged with every intact
//! record kept.

use std::path::{Path, PathBuf};

use clustercomm_store::{
    Change, MarkKind, OnDamage, Outgoing, Record, RecordKey, Store, StoreError, FILE_NAME,
};

/// A directory of its own under the system's temporary directory, removed
/// when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!(
            "clustercomm-store-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        TempDir(dir)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn outgoing(receiver: &str, pseq: u64, len: usize) -> Outgoing {
    let mut body = format!("rec-{receiver}-{pseq:06}-").into_bytes();
    while body.len() < len {
        body.push(b'a' + (body.len() % 26) as u8);
    }
    Outgoing {
        receiver: receiver.into(),
        pseq,
        service: "svc".into(),
        priority: 2,
        created_ms: pseq,
        expires_ms: None,
        retry: None,
        body,
    }
}

fn mark(kind: MarkKind, node: &str, value: u64) -> Record {
    Record::Mark(clustercomm_store::Mark {
        kind,
        node: node.into(),
        epoch: 0,
        value,
    })
}

/// A small deterministic generator (xorshift), seeded from the clock
/// unless `STORE_TEST_SEED` is set; the seed is printed.
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        let seed = std::env::var("STORE_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            })
            | 1;
        println!("STORE_TEST_SEED={seed}");
        Rng(seed)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

#[tokio::test]
async fn commits_survive_a_reopen_and_marks_only_rise() {
    let dir = TempDir::new("reopen");
    let opened = Store::open(dir.path(), OnDamage::Refuse).expect("opens");
    assert!(opened.damage.is_none());
    let epoch = opened.contents.epoch;
    assert_ne!(epoch, 0, "a new store draws an epoch");
    let store = opened.store;
    let puts = (1..=5)
        .map(|n| Change::Put(Record::Outgoing(outgoing("b", n, 100))))
        .chain([Change::Put(mark(MarkKind::NextSeq, "b", 6))])
        .collect();
    store.commit(puts).await.expect("commits");
    store
        .commit(vec![
            Change::Remove(RecordKey::Outgoing("b".into(), 1)),
            Change::Put(mark(MarkKind::Acked, "b", 1)),
            // Lower than the stored mark: no change.
            Change::Put(mark(MarkKind::NextSeq, "b", 2)),
        ])
        .await
        .expect("commits");
    store.close().await;

    let reopened = Store::open(dir.path(), OnDamage::Refuse).expect("reopens");
    let contents = reopened.contents;
    assert_eq!(contents.epoch, epoch, "the epoch is kept");
    let pseqs: Vec<u64> = contents.outgoing.iter().map(|o| o.pseq).collect();
    assert_eq!(pseqs, vec![2, 3, 4, 5]);
    assert_eq!(contents.outgoing[0], outgoing("b", 2, 100));
    assert_eq!(contents.mark(MarkKind::NextSeq, "b", 0), 6);
    assert_eq!(contents.mark(MarkKind::Acked, "b", 0), 1);
    assert_eq!(contents.mark(MarkKind::Acked, "c", 0), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_commits_share_transactions() {
    let dir = TempDir::new("group");
    let store = Store::open(dir.path(), OnDamage::Refuse)
        .expect("opens")
        .store;
    let commits = (1..=400u64).map(|n| {
        let store = store.clone();
        async move {
            store
                .commit(vec![Change::Put(Record::Outgoing(outgoing("b", n, 128)))])
                .await
        }
    });
    for result in futures_join(commits).await {
        result.expect("commits");
    }
    let (transactions, commits) = (store.transactions(), store.commits());
    println!("400 commits in {transactions} transactions");
    assert_eq!(commits, 400);
    assert!(
        transactions <= 100,
        "{transactions} transactions for 400 concurrent commits: they did not share"
    );
    store.close().await;
    let contents = Store::open(dir.path(), OnDamage::Refuse)
        .expect("reopens")
        .contents;
    assert_eq!(contents.outgoing.len(), 400);
}

/// Runs `futures` as tasks of their own, results in order.
async fn futures_join<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for handle in handles {
        out.push(handle.await.expect("the task ends"));
    }
    out
}

/// A store of 300 outgoing messages of 50 B to 6 KiB (some in pages of
/// their own), 40 of them acknowledged and removed; what it holds.
async fn filled(dir: &Path) -> Vec<Outgoing> {
    let store = Store::open(dir, OnDamage::Refuse).expect("opens").store;
    let mut rng = Rng::new();
    let all: Vec<Outgoing> = (1..=300)
        .map(|n| outgoing("b", n, 50 + rng.below(6000) as usize))
        .collect();
    for chunk in all.chunks(25) {
        let puts = chunk
            .iter()
            .cloned()
            .map(|o| Change::Put(Record::Outgoing(o)))
            .collect();
        store.commit(puts).await.expect("commits");
    }
    let removals = (1..=40)
        .map(|n| Change::Remove(RecordKey::Outgoing("b".into(), n)))
        .chain([Change::Put(mark(MarkKind::Acked, "b", 40))])
        .collect();
    store.commit(removals).await.expect("commits");
    store.close().await;
    all.into_iter().filter(|o| o.pseq > 40).collect()
}

/// Where `needle` occurs in `hay`.
fn positions(hay: &[u8], needle: &[u8]) -> Vec<usize> {
    hay.windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

#[tokio::test]
async fn a_flipped_byte_is_refused_or_salvaged_keeping_every_intact_record() {
    let mut rng = Rng::new();
    let dir = TempDir::new("flip");
    let live = filled(dir.path()).await;
    let file = dir.path().join(FILE_NAME);
    let mut bytes = std::fs::read(&file).expect("reads");
    // Damage every copy of one live message's body.
    let victim = &live[rng.below(live.len() as u64) as usize];
    let copies = positions(&bytes, &victim.body);
    assert!(!copies.is_empty(), "the body is in the file");
    for at in &copies {
        let i = at + 20 + rng.below((victim.body.len() - 20) as u64) as usize;
        bytes[i] ^= 0x5a;
    }
    std::fs::write(&file, &bytes).expect("writes");

    let refused = Store::open(dir.path(), OnDamage::Refuse).expect_err("damage is refused");
    assert!(
        matches!(&refused, StoreError::Damaged { path, .. } if path == &file),
        "{refused}"
    );
    println!("refused: {refused}");

    let opened = Store::open(dir.path(), OnDamage::Salvage).expect("salvages");
    let damage = opened.damage.expect("the damage is reported");
    println!("salvaged: {damage}");
    assert!(damage.unreadable_count >= 1, "the damaged record is named");
    assert!(damage.moved_to.exists(), "the damaged file is kept");
    let expected: Vec<&Outgoing> = live.iter().filter(|o| o.pseq != victim.pseq).collect();
    let got: Vec<&Outgoing> = opened
        .contents
        .outgoing
        .iter()
        .filter(|o| o.pseq != victim.pseq)
        .collect();
    assert_eq!(got, expected, "every intact live record is kept, unchanged");
    assert!(
        opened.contents.outgoing.iter().all(|o| o.pseq > 40),
        "acknowledged records found in free space stay done"
    );
    opened.store.close().await;
    // The new file opens cleanly.
    let again = Store::open(dir.path(), OnDamage::Refuse).expect("the salvaged store opens");
    assert_eq!(again.contents.outgoing.len(), got.len());
}

#[tokio::test]
async fn a_truncated_file_is_refused_or_salvaged_keeping_every_intact_record() {
    let mut rng = Rng::new();
    let dir = TempDir::new("truncate");
    let live = filled(dir.path()).await;
    let file = dir.path().join(FILE_NAME);
    let bytes = std::fs::read(&file).expect("reads");
    let cut = 4096 + rng.below(bytes.len() as u64 - 4096) as usize;
    println!("file of {} bytes cut at {cut}", bytes.len());
    std::fs::write(&file, &bytes[..cut]).expect("writes");

    let refused = Store::open(dir.path(), OnDamage::Refuse).expect_err("damage is refused");
    assert!(matches!(refused, StoreError::Damaged { .. }), "{refused}");

    let opened = Store::open(dir.path(), OnDamage::Salvage).expect("salvages");
    let damage = opened.damage.expect("the damage is reported");
    println!("salvaged: {damage}");
    // Intact: a live record whose whole frame is still in the file.
    let intact: Vec<&Outgoing> = live
        .iter()
        .filter(|o| {
            let framed = frame_of(o);
            !positions(&bytes[..cut], &framed).is_empty()
        })
        .collect();
    let got: Vec<&Outgoing> = opened.contents.outgoing.iter().collect();
    for o in &intact {
        assert!(got.contains(o), "intact record {} kept", o.pseq);
    }
    // An acknowledged record may come back only if the truncation took
    // the `Acked` mark that said so, and only as a copy that really is in
    // the file: sent again, its receiver drops it as a copy (its own
    // `Received` mark). Nothing made up ever comes back.
    let acked_mark = frame_of_record(&mark(MarkKind::Acked, "b", 40));
    let mark_kept = !positions(&bytes[..cut], &acked_mark).is_empty();
    for o in &got {
        if live.contains(o) {
            continue;
        }
        assert!(
            !mark_kept && o.pseq <= 40 && !positions(&bytes[..cut], &frame_of(o)).is_empty(),
            "record {} is neither live nor an acknowledged one whose mark was cut off",
            o.pseq
        );
    }
    println!(
        "{} of {} live records intact and kept",
        intact.len(),
        live.len()
    );
}

/// The bytes a record is stored as: the test's own copy of the format
/// (magic, length, CRC-32C, postcard), to find it in a file.
fn frame_of(o: &Outgoing) -> Vec<u8> {
    frame_of_record(&Record::Outgoing(o.clone()))
}

/// The bytes any record is stored as (see [`frame_of`]).
fn frame_of_record(record: &Record) -> Vec<u8> {
    let payload = postcard_encode(record);
    let mut out = b"ccR1".to_vec();
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

fn postcard_encode(record: &Record) -> Vec<u8> {
    postcard::to_stdvec(record).expect("encodes")
}

fn crc32c(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[tokio::test]
async fn a_file_that_is_not_a_store_is_refused() {
    let dir = TempDir::new("garbage");
    std::fs::write(dir.path().join(FILE_NAME), b"not a database at all").expect("writes");
    let refused = Store::open(dir.path(), OnDamage::Refuse).expect_err("refused");
    assert!(matches!(refused, StoreError::Damaged { .. }), "{refused}");
    let salvaged = Store::open(dir.path(), OnDamage::Salvage).expect("salvaged");
    assert!(salvaged.contents.outgoing.is_empty());
    assert_ne!(salvaged.contents.epoch, 0, "a fresh epoch");
}

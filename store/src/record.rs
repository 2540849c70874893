//! What the store holds ([`Record`]) and how each record is framed on disk:
//! a magic, its length and a CRC-32C of its contents, so that every record
//! is checked when it is read, and can be found again by a scan of a
//! damaged file (see [`crate::salvage`]).

use serde::{Deserialize, Serialize};

/// The first bytes of every framed record.
pub(crate) const MAGIC: [u8; 4] = *b"ccR1";

/// Magic, length (u32, little-endian), CRC-32C (u32, little-endian).
pub(crate) const FRAME_HEADER: usize = 12;

/// The largest record the store frames: a body of up to 2 GiB and its
/// names.
pub(crate) const MAX_RECORD: usize = (1 << 31) + (1 << 16);

/// A recoverable message this node sends, kept until its receiver
/// acknowledges it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outgoing {
    /// The receiving node.
    pub receiver: String,
    /// Its number on this node's stream to `receiver` (1, 2, ...).
    pub pseq: u64,
    /// The service addressed.
    pub service: String,
    /// Its priority, as the wire numbers it.
    pub priority: u8,
    /// When it was accepted (milliseconds since the Unix epoch).
    pub created_ms: u64,
    /// When it expires (milliseconds since the Unix epoch), if it does.
    pub expires_ms: Option<u64>,
    /// Its retry policy, if it has one.
    pub retry: Option<StoredRetry>,
    /// The body.
    pub body: Vec<u8>,
}

/// A retry policy as the store keeps it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredRetry {
    /// Attempts in all.
    pub attempts: u32,
    /// The wait before the second, in milliseconds.
    pub delay_ms: u64,
    /// What each later wait is multiplied by, in thousandths.
    pub backoff_permille: u32,
}

/// A recoverable message this node received and has not yet handed to its
/// application.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Incoming {
    /// The node that sent it.
    pub origin: String,
    /// The epoch of the sender's store (see [`Mark`]).
    pub epoch: u64,
    /// Its number on the sender's stream to this node.
    pub pseq: u64,
    /// The service addressed.
    pub service: String,
    /// Its priority, as the wire numbers it.
    pub priority: u8,
    /// When it expires (milliseconds since the Unix epoch), if it does.
    pub expires_ms: Option<u64>,
    /// The body.
    pub body: Vec<u8>,
}

/// Which high-water mark a [`Mark`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum MarkKind {
    /// This store's epoch: a random number drawn when the store was made,
    /// so that receivers tell a new store's numbers from an old one's.
    Epoch,
    /// The next number on the stream to a receiver.
    NextSeq,
    /// Every number up to this one, on the stream to a receiver, was
    /// acknowledged.
    Acked,
    /// Every number up to this one, on a sender's stream (node and epoch),
    /// was received and stored.
    Received,
    /// Every number up to this one, on a sender's stream, was handed to the
    /// application.
    Handed,
}

/// A high-water mark: a number kept per node (and, for a sender's stream,
/// per epoch) that is only ever raised. Writing a lower value than the one
/// stored changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mark {
    /// Which mark.
    pub kind: MarkKind,
    /// The node it is kept for (empty for [`MarkKind::Epoch`]).
    pub node: String,
    /// The sender's epoch, for `Received` and `Handed`; 0 otherwise.
    pub epoch: u64,
    /// The value.
    pub value: u64,
}

/// An entry of the message server's dead-letter queue: its number, its
/// description as the wire encodes it, and its body. The store does not
/// read the description.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterRecord {
    /// Its number in the queue.
    pub id: u64,
    /// What it is (sender, target, reason...), encoded by its owner.
    pub entry: Vec<u8>,
    /// The message's body.
    pub body: Vec<u8>,
}

/// One thing the store holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// A message sent and not yet acknowledged.
    Outgoing(Outgoing),
    /// A message received and not yet handed over.
    Incoming(Incoming),
    /// A high-water mark.
    Mark(Mark),
    /// A dead letter (the message server's store).
    DeadLetter(DeadLetterRecord),
}

/// What identifies a record: writing a record with the same key replaces
/// it (a [`Mark`] only if it raises it).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RecordKey {
    /// An [`Outgoing`] message: receiver and number.
    Outgoing(String, u64),
    /// An [`Incoming`] message: origin, epoch and number.
    Incoming(String, u64, u64),
    /// A [`Mark`]: kind, node and epoch.
    Mark(MarkKind, String, u64),
    /// A [`DeadLetterRecord`]: its number.
    DeadLetter(u64),
}

impl Record {
    /// The record's key.
    pub fn key(&self) -> RecordKey {
        match self {
            Record::Outgoing(o) => RecordKey::Outgoing(o.receiver.clone(), o.pseq),
            Record::Incoming(i) => RecordKey::Incoming(i.origin.clone(), i.epoch, i.pseq),
            Record::Mark(m) => RecordKey::Mark(m.kind, m.node.clone(), m.epoch),
            Record::DeadLetter(d) => RecordKey::DeadLetter(d.id),
        }
    }
}

impl RecordKey {
    /// The key as the store's table holds it.
    pub(crate) fn encode(&self) -> Vec<u8> {
        // Keys are small and plain: encoding cannot fail.
        postcard::to_stdvec(self).unwrap_or_default()
    }
}

/// Why a stored record could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// Shorter than its frame says.
    #[error("truncated: {have} bytes of a {want}-byte record")]
    Truncated {
        /// Bytes present.
        have: usize,
        /// Bytes the frame declares.
        want: usize,
    },
    /// It does not start with the record magic.
    #[error("no record magic")]
    NoMagic,
    /// Its length is beyond any record's.
    #[error("declared length {0} is beyond any record's")]
    TooLong(usize),
    /// Its checksum does not match its contents.
    #[error("checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The checksum in the frame.
        stored: u32,
        /// The checksum of the bytes read.
        computed: u32,
    },
    /// The checksum matches, and still the contents do not decode.
    #[error("undecodable contents: {0}")]
    Undecodable(String),
}

/// `record` framed: magic, length, CRC-32C, contents.
pub(crate) fn frame(record: &Record) -> Vec<u8> {
    // Encoded in place after room for the header, which is filled in
    // then: one buffer, no copy. A record is plain data: encoding cannot
    // fail.
    let mut out = vec![0u8; FRAME_HEADER];
    out = postcard::to_extend(record, out).unwrap_or_else(|_| vec![0u8; FRAME_HEADER]);
    let len = (out.len() - FRAME_HEADER) as u32;
    let crc = crc32c(&out[FRAME_HEADER..]);
    out[..4].copy_from_slice(&MAGIC);
    out[4..8].copy_from_slice(&len.to_le_bytes());
    out[8..12].copy_from_slice(&crc.to_le_bytes());
    out
}

/// The record framed at the start of `bytes`, and the length of its
/// frame.
pub(crate) fn unframe(bytes: &[u8]) -> Result<(Record, usize), RecordError> {
    if bytes.len() < FRAME_HEADER {
        return Err(if bytes.starts_with(&MAGIC[..bytes.len().min(4)]) {
            RecordError::Truncated {
                have: bytes.len(),
                want: FRAME_HEADER,
            }
        } else {
            RecordError::NoMagic
        });
    }
    if bytes[..4] != MAGIC {
        return Err(RecordError::NoMagic);
    }
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let len = word(4) as usize;
    if len > MAX_RECORD {
        return Err(RecordError::TooLong(len));
    }
    let end = FRAME_HEADER + len;
    if bytes.len() < end {
        return Err(RecordError::Truncated {
            have: bytes.len(),
            want: end,
        });
    }
    let payload = &bytes[FRAME_HEADER..end];
    let stored = word(8);
    let computed = crc32c(payload);
    if stored != computed {
        return Err(RecordError::Checksum { stored, computed });
    }
    let record =
        postcard::from_bytes(payload).map_err(|e| RecordError::Undecodable(e.to_string()))?;
    Ok((record, end))
}

/// CRC-32C (Castagnoli), bitwise by table.
pub(crate) fn crc32c(bytes: &[u8]) -> u32 {
    const TABLE: [u32; 256] = {
        let mut table = [0u32; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = i as u32;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0x82F6_3B78
                } else {
                    crc >> 1
                };
                bit += 1;
            }
            table[i] = crc;
            i += 1;
        }
        table
    };
    let mut crc = !0u32;
    for &b in bytes {
        crc = TABLE[((crc ^ b as u32) & 0xff) as usize] ^ (crc >> 8);
    }
    !crc
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        Record::Outgoing(Outgoing {
            receiver: "b".into(),
            pseq: 7,
            service: "svc".into(),
            priority: 2,
            created_ms: 1,
            expires_ms: Some(2),
            retry: Some(StoredRetry {
                attempts: 3,
                delay_ms: 10,
                backoff_permille: 2000,
            }),
            body: b"hello".to_vec(),
        })
    }

    #[test]
    fn crc32c_matches_the_standard_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn a_framed_record_reads_back_and_every_damage_is_named() {
        let framed = frame(&sample());
        assert_eq!(unframe(&framed), Ok((sample(), framed.len())));
        // Any one flipped bit past the magic and length is a checksum
        // mismatch (or, in the length, a truncation or an overlong frame).
        for at in 0..framed.len() {
            let mut bad = framed.clone();
            bad[at] ^= 0x10;
            let err = unframe(&bad).expect_err("a flipped bit is caught");
            match at {
                0..=3 => assert_eq!(err, RecordError::NoMagic),
                4..=7 => assert!(
                    matches!(
                        err,
                        RecordError::Truncated { .. }
                            | RecordError::TooLong(_)
                            | RecordError::Checksum { .. }
                    ),
                    "{err}"
                ),
                _ => assert!(matches!(err, RecordError::Checksum { .. }), "{err}"),
            }
        }
        for cut in 0..framed.len() {
            assert!(unframe(&framed[..cut]).is_err(), "cut at {cut}");
        }
    }
}

//! [`Contents`]: what a store held when it was opened.

use std::collections::HashMap;

use crate::record::{DeadLetterRecord, Incoming, Mark, MarkKind, Outgoing, Record};
use crate::store::latest;

/// What a store holds: the current version of each record, without those
/// its marks say are done.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Contents {
    /// The store's epoch (see [`MarkKind::Epoch`]).
    pub epoch: u64,
    /// Messages sent and not acknowledged, by receiver, then number.
    pub outgoing: Vec<Outgoing>,
    /// Messages received and not handed over, by sender, epoch, number.
    pub incoming: Vec<Incoming>,
    /// Every mark but the epoch.
    pub marks: Vec<Mark>,
    /// Dead letters, by number.
    pub dead_letters: Vec<DeadLetterRecord>,
}

impl Contents {
    /// The contents made of `records`, read in any order and possibly in
    /// several versions: the latest of each (the highest of a mark), and no
    /// message its marks say is done.
    pub(crate) fn from_records(records: Vec<Record>) -> Contents {
        let mut contents = Contents::default();
        let mut marks: HashMap<(MarkKind, String, u64), u64> = HashMap::new();
        let mut messages = Vec::new();
        for record in latest(records).into_values() {
            match record {
                Record::Mark(m) if m.kind == MarkKind::Epoch => contents.epoch = m.value,
                Record::Mark(m) => {
                    marks.insert((m.kind, m.node.clone(), m.epoch), m.value);
                    contents.marks.push(m);
                }
                other => messages.push(other),
            }
        }
        let mark = |kind, node: &str, epoch| {
            marks
                .get(&(kind, node.to_owned(), epoch))
                .copied()
                .unwrap_or(0)
        };
        for record in messages {
            match record {
                Record::Outgoing(o) => {
                    if o.pseq > mark(MarkKind::Acked, &o.receiver, 0) {
                        contents.outgoing.push(o);
                    }
                }
                Record::Incoming(i) => {
                    if i.pseq > mark(MarkKind::Handed, &i.origin, i.epoch) {
                        contents.incoming.push(i);
                    }
                }
                Record::DeadLetter(d) => contents.dead_letters.push(d),
                Record::Mark(_) => {}
            }
        }
        contents.dead_letters.sort_by_key(|d| d.id);
        contents
            .outgoing
            .sort_by(|a, b| (&a.receiver, a.pseq).cmp(&(&b.receiver, b.pseq)));
        contents
            .incoming
            .sort_by(|a, b| (&a.origin, a.epoch, a.pseq).cmp(&(&b.origin, b.epoch, b.pseq)));
        contents
    }

    /// The value of a mark (0 if there is none).
    pub fn mark(&self, kind: MarkKind, node: &str, epoch: u64) -> u64 {
        if kind == MarkKind::Epoch {
            return self.epoch;
        }
        self.marks
            .iter()
            .find(|m| m.kind == kind && m.node == node && m.epoch == epoch)
            .map(|m| m.value)
            .unwrap_or(0)
    }

    /// Every record, to write into a new file.
    pub(crate) fn records(&self) -> Vec<Record> {
        let mut out = Vec::new();
        if self.epoch != 0 {
            out.push(Record::Mark(Mark {
                kind: MarkKind::Epoch,
                node: String::new(),
                epoch: 0,
                value: self.epoch,
            }));
        }
        out.extend(self.marks.iter().cloned().map(Record::Mark));
        out.extend(self.outgoing.iter().cloned().map(Record::Outgoing));
        out.extend(self.incoming.iter().cloned().map(Record::Incoming));
        out.extend(self.dead_letters.iter().cloned().map(Record::DeadLetter));
        out
    }
}

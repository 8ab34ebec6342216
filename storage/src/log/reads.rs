//! Reads of the whole log by position, and live subscriptions that tail it.

use super::*;

/// Records `from..=to` (at most `max`), verified.
pub(super) fn read_range(
    events: &sled::Tree,
    from: u64,
    to: u64,
    max: usize,
) -> Result<Vec<Record>, StorageError> {
    let mut out = Vec::new();
    if from > to {
        return Ok(out);
    }
    for (expected, entry) in (from..).zip(events.range(from.to_be_bytes()..=to.to_be_bytes()).take(max)) {
        let (key, value) = entry?;
        let position = decode_position("events", &key, &key)?;
        if position != expected {
            return Err(StorageError::Corrupt {
                position: expected,
                reason: "record missing from the log".into(),
            });
        }
        out.push(Record::verify(position, value)?);
    }
    if out.is_empty() {
        return Err(StorageError::Corrupt {
            position: from,
            reason: "durable record missing from the log".into(),
        });
    }
    Ok(out)
}

/// A live tail of the log; see [`EventLog::subscribe`].
pub struct Subscription {
    pub(super) events: sled::Tree,
    pub(super) durable: watch::Receiver<Durable>,
    pub(super) next: u64,
    pub(super) buffer: std::collections::VecDeque<Record>,
}

/// Records a subscription reads from the tree at a time.
pub(super) const SUBSCRIPTION_CHUNK_LEN: usize = 512;

impl Subscription {
    /// The next record, waiting until one is durable. `Err(Closed)` once the log is closed
    /// and everything durable was delivered.
    pub async fn next(&mut self) -> Result<Record, StorageError> {
        loop {
            if let Some(record) = self.buffer.pop_front() {
                return Ok(record);
            }
            let durable = *self.durable.borrow_and_update();
            if durable.position >= self.next {
                let records = read_range(&self.events, self.next, durable.position, SUBSCRIPTION_CHUNK_LEN)?;
                self.next += records.len() as u64;
                self.buffer.extend(records);
                continue;
            }
            if durable.failed {
                return Err(StorageError::Failed("writer stopped".into()));
            }
            self.durable.changed().await.map_err(|_| StorageError::Closed)?;
        }
    }

    /// The position of the next record this subscription will deliver.
    pub fn next_position(&self) -> Position {
        Position::new(self.next - self.buffer.len() as u64)
    }
}

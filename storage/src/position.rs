//! Where a record is: its global [`Position`] in the log and its [`StreamVersion`] in its
//! stream. Both count from 1; 0 is written once, as `NONE` ("before the first record": an empty
//! log ends there, a stream that does not exist is at that version), instead of `.max(1)` at
//! each call site.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A record's global position: gap-free, 1 for the first record of the log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Position(u64);

impl Position {
    /// Before the first record (an empty log's durable position).
    pub const NONE: Position = Position(0);
    /// The first record's position.
    pub const FIRST: Position = Position(1);

    pub const fn new(position: u64) -> Position {
        Position(position)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    /// The position after this one.
    pub const fn next(self) -> Position {
        Position(self.0 + 1)
    }

    /// Where a read from here starts: at the first record when asked for `NONE`.
    pub fn or_first(self) -> Position {
        self.max(Position::FIRST)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A stream's version: the number of its events, so the version of its n-th event is n.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StreamVersion(u64);

impl StreamVersion {
    /// A stream with no events (one that does not exist).
    pub const NONE: StreamVersion = StreamVersion(0);
    /// The version of a stream's first event.
    pub const FIRST: StreamVersion = StreamVersion(1);

    pub const fn new(version: u64) -> StreamVersion {
        StreamVersion(version)
    }

    pub const fn get(self) -> u64 {
        self.0
    }

    pub const fn next(self) -> StreamVersion {
        StreamVersion(self.0 + 1)
    }

    /// Where a read from here starts: at the first event when asked for `NONE`.
    pub fn or_first(self) -> StreamVersion {
        self.max(StreamVersion::FIRST)
    }
}

impl fmt::Display for StreamVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

// Comparisons with a plain count, for checks such as `record.position() == 5` (tests, audits);
// arithmetic stays explicit (`get`, `next`).
macro_rules! compare_with_u64 {
    ($t:ty) => {
        impl PartialEq<u64> for $t {
            fn eq(&self, other: &u64) -> bool {
                self.0 == *other
            }
        }
        impl PartialOrd<u64> for $t {
            fn partial_cmp(&self, other: &u64) -> Option<std::cmp::Ordering> {
                self.0.partial_cmp(other)
            }
        }
    };
}
compare_with_u64!(Position);
compare_with_u64!(StreamVersion);

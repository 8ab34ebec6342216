//! The vendored sled's changes to its write path (vendor/sled/PATCHES.md items 5 and 6: blind
//! transactional writes, a leaf change built at its final size) against a model: random
//! inserts, overwrites and removals through transactions give the same contents as a
//! `BTreeMap`, read back live and after the database is reopened from its log; each write is
//! read back inside its own transaction. Item 8 (a batch manifest written by the next flush)
//! under concurrent flushes and reads. Item 10 (the rightmost leaf split near its end) on trees
//! filled in key order.

use std::collections::BTreeMap;

use proptest::prelude::*;

/// One write of a transaction: `Some(value)` sets the key, `None` removes it.
type Write = (u16, Option<u8>);

fn key(k: u16) -> [u8; 2] {
    k.to_be_bytes()
}

fn contents(tree: &sled::Tree) -> BTreeMap<Vec<u8>, Vec<u8>> {
    tree.iter()
        .map(|entry| {
            let (k, v) = entry.expect("readable");
            (k.to_vec(), v.to_vec())
        })
        .collect()
}

/// Opens the database, waiting for sled's file lock: after the last handle is dropped, sled's
/// I/O threads can hold the file for a moment (as `EventLog::open` does, `LOCK_WAIT_MAX`).
fn reopen(config: &sled::Config) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        match config.open() {
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            result => return result.unwrap(),
        }
    }
}

fn apply(model: &mut BTreeMap<Vec<u8>, Vec<u8>>, writes: &[Write]) {
    for &(k, value) in writes {
        match value {
            Some(v) => model.insert(key(k).to_vec(), vec![v; 1 + v as usize % 40]),
            None => model.remove(key(k).as_slice()),
        };
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn blind_writes_leave_what_the_model_says(
        transactions in prop::collection::vec(
            prop::collection::vec((0u16..600, prop::option::weighted(0.8, any::<u8>())), 1..40),
            1..60,
        )
    ) {
        let dir = tempfile::tempdir().unwrap();
        let mut model = BTreeMap::new();
        {
            let db = sled::open(dir.path()).unwrap();
            let tree = db.open_tree("t").unwrap();
            for writes in &transactions {
                tree.transaction(|tx| {
                    for &(k, value) in writes {
                        let value = value.map(|v| vec![v; 1 + v as usize % 40]);
                        match &value {
                            Some(v) => tx.insert_blind(key(k).to_vec(), v.clone()),
                            None => tx.remove_blind(key(k).to_vec()),
                        }
                        // Read your own blind write inside the transaction.
                        let read = tx.get(key(k))?.map(|v| v.to_vec());
                        assert_eq!(read, value, "key {k} read back inside the transaction");
                    }
                    Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
                })
                .unwrap();
                apply(&mut model, writes);
            }
            prop_assert_eq!(&contents(&tree), &model);
            db.flush().unwrap();
        }
        let db = reopen(&sled::Config::new().path(dir.path()));
        let tree = db.open_tree("t").unwrap();
        prop_assert_eq!(&contents(&tree), &model, "after reopening");
    }
}

/// PATCHES.md item 8: a transaction's batch manifest is left in its buffer for the next flush,
/// which writes it with the data after it, and anyone who must wait for it writes it first.
/// Transactions (of one writer, as in the log), flushes and reads from other threads, with a
/// cache small enough that reads page in from the log: nothing waits forever, every flushed
/// transaction is there after a reopen, and every transaction is there after the last flush.
#[test]
fn deferred_batch_manifests_are_written_by_flushes_and_waiters() {
    use sled::Transactional;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, mpsc};
    use std::time::Duration;

    const TRANSACTIONS: u64 = 3_000;
    let dir = tempfile::tempdir().unwrap();
    let open = || {
        reopen(
            &sled::Config::new()
                .path(dir.path())
                .cache_capacity(64 * 1024)
                .flush_every_ms(None),
        )
    };
    let value = |n: u64| format!("value {n} {}", "x".repeat((n % 97) as usize)).into_bytes();
    {
        let db = open();
        let records = db.open_tree("records").unwrap();
        let index = db.open_tree("index").unwrap();
        // The last transaction known flushed: everything up to it must survive a reopen.
        let flushed = Arc::new(AtomicU64::new(0));
        let committed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (done, finished) = mpsc::channel::<&'static str>();
        let flusher = {
            let (db, committed, flushed, stop, done) = (
                db.clone(),
                committed.clone(),
                flushed.clone(),
                stop.clone(),
                done.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    let upto = committed.load(Ordering::Acquire);
                    db.flush().unwrap();
                    flushed.fetch_max(upto, Ordering::AcqRel);
                    std::thread::yield_now();
                }
                done.send("flusher").unwrap();
            })
        };
        let reader = {
            let (records, committed, stop, done) =
                (records.clone(), committed.clone(), stop.clone(), done.clone());
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let upto = committed.load(Ordering::Acquire);
                    if upto > 0 {
                        // Old keys first: their pages are the ones paged out.
                        n = (n * 7 + 13) % upto + 1;
                        let got = records.get(n.to_be_bytes()).unwrap();
                        assert_eq!(got.as_deref(), Some(value(n).as_slice()), "record {n}");
                    }
                }
                done.send("reader").unwrap();
            })
        };
        let writer = {
            let (records, index, committed, done) = (records.clone(), index.clone(), committed.clone(), done);
            std::thread::spawn(move || {
                for n in 1..=TRANSACTIONS {
                    (&records, &index)
                        .transaction(|(records, index)| {
                            records.insert_blind(&n.to_be_bytes(), value(n));
                            index.insert_blind(format!("stream-{}", n % 211).as_bytes(), &n.to_be_bytes());
                            Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
                        })
                        .unwrap();
                    committed.store(n, Ordering::Release);
                }
                done.send("writer").unwrap();
            })
        };
        let patience = Duration::from_secs(120);
        assert_eq!(
            finished.recv_timeout(patience),
            Ok("writer"),
            "the writer finishes"
        );
        stop.store(true, Ordering::Release);
        for _ in 0..2 {
            finished
                .recv_timeout(patience)
                .expect("the flusher and the reader finish (no wait left hanging)");
        }
        for thread in [writer, flusher, reader] {
            thread.join().unwrap();
        }
        assert!(
            flushed.load(Ordering::Acquire) > 0,
            "some flush covered a transaction"
        );
        db.flush().unwrap();
    }
    let db = open();
    let records = db.open_tree("records").unwrap();
    assert_eq!(
        records.len() as u64,
        TRANSACTIONS,
        "every transaction after the last flush"
    );
    for n in 1..=TRANSACTIONS {
        assert_eq!(
            records.get(n.to_be_bytes()).unwrap().as_deref(),
            Some(value(n).as_slice())
        );
    }
    let index = db.open_tree("index").unwrap();
    assert_eq!(index.len(), 211);
}

/// PATCHES.md item 8, with sled's periodic flusher (`flush_every_ms`, sled's default, not the
/// log's): a transaction with no explicit flush after it is on disk once the flusher has run,
/// batch manifest included. The database's files are copied while it is open (what a kill
/// would leave) until the copy opens with the transaction in it.
#[test]
fn the_periodic_flusher_writes_a_deferred_batch_manifest() {
    use sled::Transactional;
    use std::time::{Duration, Instant};

    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new()
        .path(dir.path())
        .flush_every_ms(Some(10))
        .open()
        .unwrap();
    let (a, b) = (db.open_tree("a").unwrap(), db.open_tree("b").unwrap());
    (&a, &b)
        .transaction(|(a, b)| {
            a.insert_blind(&b"key"[..], &b"a"[..]);
            b.insert_blind(&b"key"[..], &b"b"[..]);
            Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
        })
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut copies = 0;
    loop {
        copies += 1;
        let copy = tempfile::tempdir().unwrap();
        copy_files(dir.path(), copy.path());
        let reopened = sled::open(copy.path()).unwrap();
        let got = reopened.open_tree("b").unwrap().get(b"key").unwrap();
        if got.as_deref() == Some(&b"b"[..]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the transaction never reached the disk without an explicit flush ({copies} copies)"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(db);
}

fn copy_files(from: &std::path::Path, to: &std::path::Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_files(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// PATCHES.md item 9: `Tree::last_in(lo, hi)` (a lookup in the leaf that holds `hi`, with
    /// the iterator as fallback) answers as `range(lo..=hi).next_back()` for every range, on a
    /// tree of many leaves, live and after a reopen (leaves paged in from the log).
    #[test]
    fn last_in_answers_as_the_reverse_iterator(
        keys in prop::collection::btree_set(0u16..4_000, 0..600),
        removed in prop::collection::vec(0u16..4_000, 0..100),
        ranges in prop::collection::vec((0u16..4_100, 0u16..300), 1..80),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let config = sled::Config::new().path(dir.path()).cache_capacity(64 * 1024).flush_every_ms(None);
        let check = |tree: &sled::Tree| -> Result<(), TestCaseError> {
            for &(lo, len) in &ranges {
                let (lo, hi) = (key(lo), key(lo.saturating_add(len)));
                let expected = tree.range(lo..=hi).next_back().transpose().unwrap();
                prop_assert_eq!(tree.last_in(lo, hi).unwrap(), expected, "range {:?}..={:?}", lo, hi);
                // An empty range (lo above hi) has nothing.
                prop_assert_eq!(tree.last_in(hi, lo).unwrap().filter(|_| lo != hi), None);
            }
            Ok(())
        };
        {
            let db = reopen(&config);
            let tree = db.open_tree("t").unwrap();
            for &k in &keys {
                tree.insert(key(k), vec![(k % 251) as u8; 1 + k as usize % 30]).unwrap();
            }
            for &k in &removed {
                tree.remove(key(k)).unwrap();
            }
            check(&tree)?;
            db.flush().unwrap();
        }
        let db = reopen(&config);
        check(&db.open_tree("t").unwrap())?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// PATCHES.md item 10: the rightmost leaf splits near its end instead of in half. Keys
    /// appended in order (as our records and outbox entries are, 8-byte big-endian positions
    /// sharing their leading bytes, so that the leaves' key prefixes are re-encoded at every
    /// split), mixed with inserts below the end and removals from the front (as the outbox's
    /// deletions), through transactions and plain writes: the tree holds what the model says,
    /// every key reads back, and both iteration directions agree, live and after a reopen with
    /// a cache small enough that leaves page in from the log.
    #[test]
    fn a_tree_filled_in_key_order_holds_what_the_model_says(
        ops in prop::collection::vec((0u8..12, 1u64..40, any::<u8>()), 1..2_000),
    ) {
        use sled::Transactional;

        const BASE: u64 = 0x0100_0000_0000_0000;
        let dir = tempfile::tempdir().unwrap();
        let config = sled::Config::new().path(dir.path()).cache_capacity(64 * 1024).flush_every_ms(None);
        let value = |v: u8| vec![v; 1 + v as usize % 60];
        let mut model: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let check = |tree: &sled::Tree, model: &BTreeMap<Vec<u8>, Vec<u8>>| -> Result<(), TestCaseError> {
            prop_assert_eq!(&contents(tree), model);
            let backwards: Vec<Vec<u8>> = tree.iter().rev().map(|e| e.unwrap().0.to_vec()).collect();
            let mut expected: Vec<Vec<u8>> = model.keys().cloned().collect();
            expected.reverse();
            prop_assert_eq!(backwards, expected);
            for (k, v) in model {
                prop_assert_eq!(tree.get(k).unwrap().map(|v| v.to_vec()), Some(v.clone()));
            }
            Ok(())
        };
        {
            let db = reopen(&config);
            let tree = db.open_tree("t").unwrap();
            let mut next = BASE;
            for &(kind, step, v) in &ops {
                match kind {
                    // Appends at the end, in a transaction (the log's writer) or plainly.
                    0..=6 => {
                        next += step;
                        let k = next.to_be_bytes().to_vec();
                        if kind % 2 == 0 {
                            (&tree,).transaction(|(t,)| {
                                t.insert_blind(k.clone(), value(v));
                                Ok::<_, sled::transaction::ConflictableTransactionError<()>>(())
                            }).unwrap();
                        } else {
                            tree.insert(k.clone(), value(v)).unwrap();
                        }
                        model.insert(k, value(v));
                    }
                    // An insert below the end (another stream's key in an index tree).
                    7..=9 => {
                        let k = (BASE + (u64::from(v) * step * 7) % (next - BASE + 1)).to_be_bytes().to_vec();
                        tree.insert(k.clone(), value(v)).unwrap();
                        model.insert(k, value(v));
                    }
                    // Removals from the front (the outbox's deletions).
                    _ => {
                        let front: Vec<Vec<u8>> = model.keys().take(step as usize % 4 + 1).cloned().collect();
                        for k in front {
                            tree.remove(&k).unwrap();
                            model.remove(&k);
                        }
                    }
                }
            }
            check(&tree, &model)?;
            db.flush().unwrap();
        }
        let db = reopen(&config);
        check(&db.open_tree("t").unwrap(), &model)?;
    }
}

//! The vendored sled's changes to its write path (vendor/sled/PATCHES.md items 5 and 6: blind
//! transactional writes, a leaf change built at its final size) against a model: random
//! inserts, overwrites and removals through transactions give the same contents as a
//! `BTreeMap`, read back live and after the database is reopened from its log; each write is
//! read back inside its own transaction.

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
        let db = sled::open(dir.path()).unwrap();
        let tree = db.open_tree("t").unwrap();
        prop_assert_eq!(&contents(&tree), &model, "after reopening");
    }
}

//! The participants' events and the projector that keeps their read models.
//!
//! Streams:
//! - `step/<saga_id>/<step>`: everything that happened to one idempotency key: the action
//!   (`StockReserved`, `CouponLocked`, `BalanceDeducted`, `OrderCreated`, `OrderConfirmed`), or
//!   its refusal (`ActionRefused`), then its compensation (`StockReleased`, `CouponUnlocked`,
//!   `BalanceRefunded`, `OrderCancelled`) or `NullCompensated`. The barrier is the fold of this
//!   stream (see `barrier`).
//! - `seed/<kind>/<id>`: seeding of a product, coupon or account.
//!
//! Projections (keys in the log's projection tree, values bincode via the codec):
//! `stock/<product>` -> [`StockLevel`], `coupon/<id>` -> [`CouponState`], `balance/<user>` ->
//! i64, `order/<id>` -> [`OrderState`]. The projector also guards the invariants that span
//! sagas (available stock, balance and coupon state), inside the writer's transaction, so
//! that two sagas can never both take the last unit: an action that would break one is
//! refused atomically (`StorageError::Projection` carrying a [`Refusal`]).
//!
//! A compensation can break an invariant too (cancelling an order that was confirmed, say):
//! that is a message's doing, so it is a refusal as well (the consumer parks the message and
//! reports it), never a panic of the log's only writer. Panics are kept for states no input
//! can produce.
//!
//! **Stored enums: append only at the end.** bincode writes an enum's variant index, so a
//! variant inserted or moved anywhere but at the end of [`ParticipantEvent`] (or of the enums
//! it holds) silently misreads every stored log. The golden-bytes test below guards it.

use saga_storage::{EventView, ProjectError, ProjectionTx, Projector, codec};
use serde::{Deserialize, Serialize};

/// The business reasons of `saga.v1.RefusalReason`, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    OutOfStock,
    CouponNotFree,
    InsufficientBalance,
    UnknownEntity,
    AlreadyCompensated,
    InvalidState,
}

impl Refusal {
    const ALL: [Refusal; 6] = [
        Refusal::OutOfStock,
        Refusal::CouponNotFree,
        Refusal::InsufficientBalance,
        Refusal::UnknownEntity,
        Refusal::AlreadyCompensated,
        Refusal::InvalidState,
    ];

    pub fn code(self) -> &'static str {
        match self {
            Refusal::OutOfStock => "OUT_OF_STOCK",
            Refusal::CouponNotFree => "COUPON_NOT_FREE",
            Refusal::InsufficientBalance => "INSUFFICIENT_BALANCE",
            Refusal::UnknownEntity => "UNKNOWN_ENTITY",
            Refusal::AlreadyCompensated => "ALREADY_COMPENSATED",
            Refusal::InvalidState => "INVALID_STATE",
        }
    }

    /// The projector's refusal text is `CODE: detail`; this reads it back.
    pub fn parse(text: &str) -> Option<(Refusal, String)> {
        let (code, detail) = text.split_once(": ")?;
        let refusal = Refusal::ALL.into_iter().find(|r| r.code() == code)?;
        Some((refusal, detail.to_owned()))
    }

    pub fn to_proto(self) -> saga_proto::v1::RefusalReason {
        use saga_proto::v1::RefusalReason as R;
        match self {
            Refusal::OutOfStock => R::OutOfStock,
            Refusal::CouponNotFree => R::CouponNotFree,
            Refusal::InsufficientBalance => R::InsufficientBalance,
            Refusal::UnknownEntity => R::UnknownEntity,
            Refusal::AlreadyCompensated => R::AlreadyCompensated,
            Refusal::InvalidState => R::InvalidState,
        }
    }
}

fn refuse(refusal: Refusal, detail: impl std::fmt::Display) -> ProjectError {
    ProjectError::Refused(format!("{}: {detail}", refusal.code()))
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub product_id: String,
    pub quantity: i64,
}

/// Every event of every participant role (a process uses the subset of its role).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParticipantEvent {
    // Seeding.
    StockSeeded {
        product_id: String,
        available: i64,
    },
    CouponIssued {
        coupon_id: String,
        owner_user_id: String,
        value_minor: i64,
    },
    AccountOpened {
        user_id: String,
        balance_minor: i64,
    },
    // Actions.
    StockReserved {
        order_id: String,
        items: Vec<Item>,
    },
    CouponLocked {
        coupon_id: String,
        user_id: String,
        order_id: String,
    },
    BalanceDeducted {
        user_id: String,
        amount_minor: i64,
        order_id: String,
    },
    OrderCreated {
        order_id: String,
        user_id: String,
        items: Vec<Item>,
        amount_minor: i64,
        coupon_id: String,
    },
    OrderConfirmed {
        order_id: String,
    },
    ActionRefused {
        refusal: Refusal,
        detail: String,
    },
    // Compensations.
    StockReleased {
        order_id: String,
        items: Vec<Item>,
    },
    CouponUnlocked {
        coupon_id: String,
        order_id: String,
    },
    BalanceRefunded {
        user_id: String,
        amount_minor: i64,
        order_id: String,
    },
    OrderCancelled {
        order_id: String,
    },
    NullCompensated,
    // Consumer log, stream `consumer/<group>/<tag>/<key>` (see `consumer`).
    ConsumeStarted {
        attempt: u32,
    },
    ConsumeSucceeded {
        outcome: String,
    },
    ConsumeFailed {
        tries: u32,
        error: String,
    },
    MessageParked {
        group: String,
        tag: String,
        key: String,
        tries: u32,
        error: String,
        body: Vec<u8>,
        parked_at_unix_ms: i64,
    },
    ParkedRequeued,
    /// A message parked by the consumer (stream `consumer/...`, or `poison/...` for a message
    /// that is not a valid compensation). Replaces `MessageParked` (kept for old logs): the
    /// body is kept up to [`PARKED_BODY_LEN_MAX`] bytes with its length and digest, so a body
    /// too large for the log parks all the same, and the parked list is keyed by the digest,
    /// so two different messages parked under one key both stay listed.
    MessageParkedDigest {
        group: String,
        tag: String,
        key: String,
        tries: u32,
        error: String,
        body_prefix: Vec<u8>,
        body_len: u64,
        body_digest: u64,
        parked_at_unix_ms: i64,
    },
    /// The parked message with this digest was published again (RequeueParked, or a new
    /// delivery of its key after a RetrySaga): its tries start again. Replaces
    /// `ParkedRequeued` for `MessageParkedDigest` entries.
    ParkedMessageRequeued {
        body_digest: u64,
    },
    /// A duplicate delivery of a compensation that had succeeded: its acknowledgement was
    /// written to the outbox again in the same append (the first may have been lost).
    DuplicateAcknowledged {
        outcome: String,
    },
}

/// Most bytes of a parked message's body kept in its parking event.
pub const PARKED_BODY_LEN_MAX: usize = 64 * 1024;

/// The digest that names a parked body (xxh3-64).
pub fn body_digest(body: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(body)
}

/// The parked-list key of a parked message: `parked/<stream>@<digest, 16 hex digits>`.
pub fn parked_key(stream: &str, body_digest: u64) -> String {
    format!("parked/{stream}@{body_digest:016x}")
}

impl ParticipantEvent {
    pub fn name(&self) -> &'static str {
        match self {
            ParticipantEvent::StockSeeded { .. } => "StockSeeded",
            ParticipantEvent::CouponIssued { .. } => "CouponIssued",
            ParticipantEvent::AccountOpened { .. } => "AccountOpened",
            ParticipantEvent::StockReserved { .. } => "StockReserved",
            ParticipantEvent::CouponLocked { .. } => "CouponLocked",
            ParticipantEvent::BalanceDeducted { .. } => "BalanceDeducted",
            ParticipantEvent::OrderCreated { .. } => "OrderCreated",
            ParticipantEvent::OrderConfirmed { .. } => "OrderConfirmed",
            ParticipantEvent::ActionRefused { .. } => "ActionRefused",
            ParticipantEvent::StockReleased { .. } => "StockReleased",
            ParticipantEvent::CouponUnlocked { .. } => "CouponUnlocked",
            ParticipantEvent::BalanceRefunded { .. } => "BalanceRefunded",
            ParticipantEvent::OrderCancelled { .. } => "OrderCancelled",
            ParticipantEvent::NullCompensated => "NullCompensated",
            ParticipantEvent::ConsumeStarted { .. } => "ConsumeStarted",
            ParticipantEvent::ConsumeSucceeded { .. } => "ConsumeSucceeded",
            ParticipantEvent::ConsumeFailed { .. } => "ConsumeFailed",
            ParticipantEvent::MessageParked { .. } => "MessageParked",
            ParticipantEvent::ParkedRequeued => "ParkedRequeued",
            ParticipantEvent::MessageParkedDigest { .. } => "MessageParkedDigest",
            ParticipantEvent::ParkedMessageRequeued { .. } => "ParkedMessageRequeued",
            ParticipantEvent::DuplicateAcknowledged { .. } => "DuplicateAcknowledged",
        }
    }

    /// The event that undoes this action; `None` for events that are not undoable actions.
    pub fn undo(&self) -> Option<ParticipantEvent> {
        Some(match self {
            ParticipantEvent::StockReserved { order_id, items } => ParticipantEvent::StockReleased {
                order_id: order_id.clone(),
                items: items.clone(),
            },
            ParticipantEvent::CouponLocked {
                coupon_id, order_id, ..
            } => ParticipantEvent::CouponUnlocked {
                coupon_id: coupon_id.clone(),
                order_id: order_id.clone(),
            },
            ParticipantEvent::BalanceDeducted {
                user_id,
                amount_minor,
                order_id,
            } => ParticipantEvent::BalanceRefunded {
                user_id: user_id.clone(),
                amount_minor: *amount_minor,
                order_id: order_id.clone(),
            },
            ParticipantEvent::OrderCreated { order_id, .. } => ParticipantEvent::OrderCancelled {
                order_id: order_id.clone(),
            },
            _ => return None,
        })
    }
}

/// `stock/<product>`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLevel {
    pub available: i64,
    pub reserved: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CouponStatus {
    Free,
    Locked,
}

/// `coupon/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CouponState {
    pub owner_user_id: String,
    pub value_minor: i64,
    pub status: CouponStatus,
    pub locked_by_order_id: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OrderStatus {
    Pending,
    Confirmed,
    Cancelled,
}

/// `order/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderState {
    pub user_id: String,
    pub items: Vec<Item>,
    pub amount_minor: i64,
    pub coupon_id: String,
    pub status: OrderStatus,
}

pub fn stock_key(product_id: &str) -> String {
    format!("stock/{product_id}")
}
pub fn coupon_key(coupon_id: &str) -> String {
    format!("coupon/{coupon_id}")
}
pub fn balance_key(user_id: &str) -> String {
    format!("balance/{user_id}")
}
pub fn order_key(order_id: &str) -> String {
    format!("order/{order_id}")
}

fn get<T: serde::de::DeserializeOwned>(tx: &ProjectionTx<'_>, key: &str) -> Result<Option<T>, ProjectError> {
    match tx.get(key)? {
        Some(bytes) => Ok(Some(codec::decode(&bytes)?)),
        None => Ok(None),
    }
}

fn put<T: Serialize>(tx: &mut ProjectionTx<'_>, key: &str, value: &T) -> Result<(), ProjectError> {
    tx.insert(key, codec::encode(value)?)
}

/// Keeps the projections and guards the cross-saga invariants.
pub struct ParticipantProjector;

impl Projector for ParticipantProjector {
    fn project(&self, view: &EventView<'_>, tx: &mut ProjectionTx<'_>) -> Result<(), ProjectError> {
        let event: ParticipantEvent = codec::decode(view.payload)?;
        match event {
            ParticipantEvent::StockSeeded {
                product_id,
                available,
            } => put(
                tx,
                &stock_key(&product_id),
                &StockLevel {
                    available,
                    reserved: 0,
                },
            ),
            ParticipantEvent::CouponIssued {
                coupon_id,
                owner_user_id,
                value_minor,
            } => put(
                tx,
                &coupon_key(&coupon_id),
                &CouponState {
                    owner_user_id,
                    value_minor,
                    status: CouponStatus::Free,
                    locked_by_order_id: String::new(),
                },
            ),
            ParticipantEvent::AccountOpened {
                user_id,
                balance_minor,
            } => put(tx, &balance_key(&user_id), &balance_minor),
            ParticipantEvent::StockReserved { items, .. } => {
                // All-or-nothing: check every item before changing any.
                let mut levels = Vec::with_capacity(items.len());
                for item in &items {
                    let key = stock_key(&item.product_id);
                    let Some(mut level) = get::<StockLevel>(tx, &key)? else {
                        return Err(refuse(
                            Refusal::UnknownEntity,
                            format!("product {}", item.product_id),
                        ));
                    };
                    if level.available < item.quantity {
                        return Err(refuse(
                            Refusal::OutOfStock,
                            format!(
                                "product {}: {} available, {} wanted",
                                item.product_id, level.available, item.quantity
                            ),
                        ));
                    }
                    level.available -= item.quantity;
                    level.reserved += item.quantity;
                    levels.push((key, level));
                }
                for (key, level) in levels {
                    put(tx, &key, &level)?;
                }
                Ok(())
            }
            ParticipantEvent::StockReleased { items, .. } => {
                // A release follows its reservation, so the units are reserved; a log where
                // they are not is refused (parked), not trusted.
                let mut levels = Vec::with_capacity(items.len());
                for item in &items {
                    let key = stock_key(&item.product_id);
                    let mut level = get::<StockLevel>(tx, &key)?.unwrap_or_default();
                    if level.reserved < item.quantity {
                        return Err(refuse(
                            Refusal::InvalidState,
                            format!(
                                "release of {} units of {} beyond its {} reserved",
                                item.quantity, item.product_id, level.reserved
                            ),
                        ));
                    }
                    level.available += item.quantity;
                    level.reserved -= item.quantity;
                    levels.push((key, level));
                }
                for (key, level) in levels {
                    put(tx, &key, &level)?;
                }
                Ok(())
            }
            ParticipantEvent::CouponLocked {
                coupon_id,
                user_id,
                order_id,
            } => {
                let key = coupon_key(&coupon_id);
                let Some(mut coupon) = get::<CouponState>(tx, &key)? else {
                    return Err(refuse(
                        Refusal::CouponNotFree,
                        format!("coupon {coupon_id} does not exist"),
                    ));
                };
                if coupon.status != CouponStatus::Free || coupon.owner_user_id != user_id {
                    return Err(refuse(
                        Refusal::CouponNotFree,
                        format!(
                            "coupon {coupon_id} is {:?} and owned by {}",
                            coupon.status, coupon.owner_user_id
                        ),
                    ));
                }
                coupon.status = CouponStatus::Locked;
                coupon.locked_by_order_id = order_id;
                put(tx, &key, &coupon)
            }
            ParticipantEvent::CouponUnlocked { coupon_id, order_id } => {
                let key = coupon_key(&coupon_id);
                let Some(mut coupon) = get::<CouponState>(tx, &key)? else {
                    return Err(refuse(Refusal::UnknownEntity, format!("coupon {coupon_id}")));
                };
                if coupon.status != CouponStatus::Locked || coupon.locked_by_order_id != order_id {
                    return Err(refuse(
                        Refusal::InvalidState,
                        format!(
                            "coupon {coupon_id} is {:?} by {:?}, not locked by order {order_id}",
                            coupon.status, coupon.locked_by_order_id
                        ),
                    ));
                }
                coupon.status = CouponStatus::Free;
                coupon.locked_by_order_id.clear();
                put(tx, &key, &coupon)
            }
            ParticipantEvent::BalanceDeducted {
                user_id,
                amount_minor,
                ..
            } => {
                let key = balance_key(&user_id);
                let Some(balance) = get::<i64>(tx, &key)? else {
                    return Err(refuse(Refusal::UnknownEntity, format!("user {user_id}")));
                };
                if balance < amount_minor {
                    return Err(refuse(
                        Refusal::InsufficientBalance,
                        format!("user {user_id} has {balance}, {amount_minor} wanted"),
                    ));
                }
                put(tx, &key, &(balance - amount_minor))
            }
            ParticipantEvent::BalanceRefunded {
                user_id,
                amount_minor,
                ..
            } => {
                let key = balance_key(&user_id);
                let Some(balance) = get::<i64>(tx, &key)? else {
                    return Err(refuse(Refusal::UnknownEntity, format!("user {user_id}")));
                };
                put(tx, &key, &(balance + amount_minor))
            }
            ParticipantEvent::OrderCreated {
                order_id,
                user_id,
                items,
                amount_minor,
                coupon_id,
            } => {
                let key = order_key(&order_id);
                if get::<OrderState>(tx, &key)?.is_some() {
                    return Err(refuse(
                        Refusal::InvalidState,
                        format!("order {order_id} exists already"),
                    ));
                }
                put(
                    tx,
                    &key,
                    &OrderState {
                        user_id,
                        items,
                        amount_minor,
                        coupon_id,
                        status: OrderStatus::Pending,
                    },
                )
            }
            ParticipantEvent::OrderConfirmed { order_id } => {
                let key = order_key(&order_id);
                let Some(mut order) = get::<OrderState>(tx, &key)? else {
                    return Err(refuse(Refusal::UnknownEntity, format!("order {order_id}")));
                };
                if order.status != OrderStatus::Pending {
                    return Err(refuse(
                        Refusal::InvalidState,
                        format!("order {order_id} is {:?}", order.status),
                    ));
                }
                order.status = OrderStatus::Confirmed;
                put(tx, &key, &order)
            }
            ParticipantEvent::OrderCancelled { order_id } => {
                let key = order_key(&order_id);
                let Some(mut order) = get::<OrderState>(tx, &key)? else {
                    return Err(refuse(Refusal::UnknownEntity, format!("order {order_id}")));
                };
                // The saga never compensates past its pivot; a message that asks for it is
                // refused (and parked), the order stays confirmed.
                if order.status != OrderStatus::Pending {
                    return Err(refuse(
                        Refusal::InvalidState,
                        format!(
                            "order {order_id} is {:?}; only a pending order is cancelled",
                            order.status
                        ),
                    ));
                }
                order.status = OrderStatus::Cancelled;
                put(tx, &key, &order)
            }
            ParticipantEvent::MessageParked { .. } => {
                // The parked list: key = the consumer log stream, value = the parking event.
                tx.insert(format!("parked/{}", view.stream), view.payload.to_vec())
            }
            ParticipantEvent::ParkedRequeued => tx.remove(format!("parked/{}", view.stream)),
            ParticipantEvent::MessageParkedDigest { body_digest, .. } => {
                tx.insert(parked_key(view.stream, body_digest), view.payload.to_vec())
            }
            ParticipantEvent::ParkedMessageRequeued { body_digest } => {
                tx.remove(parked_key(view.stream, body_digest))
            }
            ParticipantEvent::ActionRefused { .. }
            | ParticipantEvent::NullCompensated
            | ParticipantEvent::ConsumeStarted { .. }
            | ParticipantEvent::ConsumeSucceeded { .. }
            | ParticipantEvent::ConsumeFailed { .. }
            | ParticipantEvent::DuplicateAcknowledged { .. } => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// One value of every variant, in declaration order, with the bytes it was first stored
    /// as. A failure here means stored logs would be misread: add new variants at the end
    /// instead, and never change an existing one.
    #[test]
    fn stored_participant_events_keep_their_encoding() {
        let s = |x: &str| x.to_owned();
        let item = || Item {
            product_id: s("p"),
            quantity: 2,
        };
        let cases = vec![
            ParticipantEvent::StockSeeded {
                product_id: s("p"),
                available: 3,
            },
            ParticipantEvent::CouponIssued {
                coupon_id: s("c"),
                owner_user_id: s("u"),
                value_minor: 5,
            },
            ParticipantEvent::AccountOpened {
                user_id: s("u"),
                balance_minor: 9,
            },
            ParticipantEvent::StockReserved {
                order_id: s("o"),
                items: vec![item()],
            },
            ParticipantEvent::CouponLocked {
                coupon_id: s("c"),
                user_id: s("u"),
                order_id: s("o"),
            },
            ParticipantEvent::BalanceDeducted {
                user_id: s("u"),
                amount_minor: 4,
                order_id: s("o"),
            },
            ParticipantEvent::OrderCreated {
                order_id: s("o"),
                user_id: s("u"),
                items: vec![item()],
                amount_minor: 4,
                coupon_id: s("c"),
            },
            ParticipantEvent::OrderConfirmed { order_id: s("o") },
            ParticipantEvent::ActionRefused {
                refusal: Refusal::InvalidState,
                detail: s("d"),
            },
            ParticipantEvent::StockReleased {
                order_id: s("o"),
                items: vec![item()],
            },
            ParticipantEvent::CouponUnlocked {
                coupon_id: s("c"),
                order_id: s("o"),
            },
            ParticipantEvent::BalanceRefunded {
                user_id: s("u"),
                amount_minor: 4,
                order_id: s("o"),
            },
            ParticipantEvent::OrderCancelled { order_id: s("o") },
            ParticipantEvent::NullCompensated,
            ParticipantEvent::ConsumeStarted { attempt: 1 },
            ParticipantEvent::ConsumeSucceeded { outcome: s("x") },
            ParticipantEvent::ConsumeFailed {
                tries: 2,
                error: s("e"),
            },
            ParticipantEvent::MessageParked {
                group: s("g"),
                tag: s("t"),
                key: s("k"),
                tries: 3,
                error: s("e"),
                body: vec![1],
                parked_at_unix_ms: 6,
            },
            ParticipantEvent::ParkedRequeued,
            ParticipantEvent::MessageParkedDigest {
                group: s("g"),
                tag: s("t"),
                key: s("k"),
                tries: 3,
                error: s("e"),
                body_prefix: vec![1],
                body_len: 1,
                body_digest: 8,
                parked_at_unix_ms: 6,
            },
            ParticipantEvent::ParkedMessageRequeued { body_digest: 8 },
            ParticipantEvent::DuplicateAcknowledged { outcome: s("x") },
        ];
        let actual: Vec<String> = cases
            .iter()
            .map(|e| hex(&codec::encode(e).expect("encodes")))
            .collect();
        assert_eq!(actual, GOLDEN);
        // The read models are stored with the codec too.
        let level = StockLevel {
            available: 1,
            reserved: 2,
        };
        let coupon = CouponState {
            owner_user_id: s("u"),
            value_minor: 5,
            status: CouponStatus::Locked,
            locked_by_order_id: s("o"),
        };
        let order = OrderState {
            user_id: s("u"),
            items: vec![item()],
            amount_minor: 4,
            coupon_id: s("c"),
            status: OrderStatus::Cancelled,
        };
        let models = [
            hex(&codec::encode(&level).expect("encodes")),
            hex(&codec::encode(&coupon).expect("encodes")),
            hex(&codec::encode(&order).expect("encodes")),
        ];
        assert_eq!(models, GOLDEN_MODELS);
    }

    const GOLDEN: &[&str] = &[
        "00017006",
        "01016301750a",
        "02017512",
        "03016f01017004",
        "0401630175016f",
        "05017508016f",
        "06016f017501017004080163",
        "07016f",
        "08050164",
        "09016f01017004",
        "0a0163016f",
        "0b017508016f",
        "0c016f",
        "0d",
        "0e01",
        "0f0178",
        "10020165",
        "1101670174016b03016501010c",
        "12",
        "1301670174016b030165010101080c",
        "1408",
        "150178",
    ];
    const GOLDEN_MODELS: [&str; 3] = ["0204", "01750a01016f", "01750101700408016302"];
}

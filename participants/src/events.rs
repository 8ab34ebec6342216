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
                for item in &items {
                    let key = stock_key(&item.product_id);
                    let mut level = get::<StockLevel>(tx, &key)?.unwrap_or_default();
                    // Invariant: a release follows its reservation, so the units are reserved.
                    assert!(
                        level.reserved >= item.quantity,
                        "release of {} beyond its reservation",
                        item.product_id
                    );
                    level.available += item.quantity;
                    level.reserved -= item.quantity;
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
                let mut coupon =
                    get::<CouponState>(tx, &key)?.expect("an unlocked coupon was locked, so it exists");
                assert_eq!(
                    coupon.locked_by_order_id, order_id,
                    "unlock by the order that locked it"
                );
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
                let balance = get::<i64>(tx, &key)?.expect("a refunded account was deducted, so it exists");
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
                let mut order =
                    get::<OrderState>(tx, &key)?.expect("a cancelled order was created, so it exists");
                assert_ne!(
                    order.status,
                    OrderStatus::Confirmed,
                    "a confirmed order is never compensated"
                );
                order.status = OrderStatus::Cancelled;
                put(tx, &key, &order)
            }
            ParticipantEvent::MessageParked { .. } => {
                // The parked list: key = the consumer log stream, value = the parking event.
                tx.insert(format!("parked/{}", view.stream), view.payload.to_vec())
            }
            ParticipantEvent::ParkedRequeued => tx.remove(format!("parked/{}", view.stream)),
            ParticipantEvent::ActionRefused { .. }
            | ParticipantEvent::NullCompensated
            | ParticipantEvent::ConsumeStarted { .. }
            | ParticipantEvent::ConsumeSucceeded { .. }
            | ParticipantEvent::ConsumeFailed { .. } => Ok(()),
        }
    }
}

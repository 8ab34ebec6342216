//! How participant events are stored: one record format for every role's events.
//!
//! A participant's log holds the events of its role ([`StockEvent`], [`CouponEvent`],
//! [`BalanceEvent`], [`OrderEvent`]), of the barrier ([`StepEvent`]) and of the consumer log
//! ([`ConsumerEvent`]). Each family is owned by its module; [`ParticipantEvent`] is their sum,
//! the type a record's payload decodes to.
//!
//! **Stored enums: append only at the end.** bincode writes an enum's variant index. The
//! stored form is the flat enum [`Stored`] below (the form every log written so far holds:
//! one variant per event, in the order they were first added), and `ParticipantEvent`
//! converts to and from it through serde (`#[serde(from, into)]`), so the families can be
//! regrouped without touching a byte on disk. A new event is a new variant at the end of
//! `Stored` (and in its family); never insert, move or change one. The golden-bytes test
//! below guards it.

use serde::{Deserialize, Serialize};

use crate::balance::BalanceEvent;
use crate::barrier::StepEvent;
use crate::consumer_log::ConsumerEvent;
use crate::coupon::CouponEvent;
use crate::order::OrderEvent;
use crate::refusal::Refusal;
use crate::stock::{Item, StockEvent};

/// Every event a participant's log can hold, grouped by the module that owns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Stored", into = "Stored")]
pub enum ParticipantEvent {
    Stock(StockEvent),
    Coupon(CouponEvent),
    Balance(BalanceEvent),
    Order(OrderEvent),
    Step(StepEvent),
    Consumer(ConsumerEvent),
}

impl ParticipantEvent {
    /// The record's event type (stored in its envelope; stable).
    pub fn name(&self) -> &'static str {
        match self {
            ParticipantEvent::Stock(e) => e.name(),
            ParticipantEvent::Coupon(e) => e.name(),
            ParticipantEvent::Balance(e) => e.name(),
            ParticipantEvent::Order(e) => e.name(),
            ParticipantEvent::Step(e) => e.name(),
            ParticipantEvent::Consumer(e) => e.name(),
        }
    }

    /// The event that undoes this action; `None` for anything that is not an undoable action.
    pub fn undo(&self) -> Option<ParticipantEvent> {
        match self {
            ParticipantEvent::Stock(e) => e.undo().map(ParticipantEvent::Stock),
            ParticipantEvent::Coupon(e) => e.undo().map(ParticipantEvent::Coupon),
            ParticipantEvent::Balance(e) => e.undo().map(ParticipantEvent::Balance),
            ParticipantEvent::Order(e) => e.undo().map(ParticipantEvent::Order),
            ParticipantEvent::Step(_) | ParticipantEvent::Consumer(_) => None,
        }
    }

    /// Whether this is a step's action (what a forward call records).
    pub fn is_action(&self) -> bool {
        match self {
            ParticipantEvent::Stock(e) => matches!(e, StockEvent::Reserved { .. }),
            ParticipantEvent::Coupon(e) => matches!(e, CouponEvent::Locked { .. }),
            ParticipantEvent::Balance(e) => matches!(e, BalanceEvent::Deducted { .. }),
            ParticipantEvent::Order(e) => {
                matches!(e, OrderEvent::Created { .. } | OrderEvent::Confirmed { .. })
            }
            ParticipantEvent::Step(_) | ParticipantEvent::Consumer(_) => false,
        }
    }

    /// Whether this is a step's compensation (an undo, or a null compensation).
    pub fn is_compensation(&self) -> bool {
        match self {
            ParticipantEvent::Stock(e) => matches!(e, StockEvent::Released { .. }),
            ParticipantEvent::Coupon(e) => matches!(e, CouponEvent::Unlocked { .. }),
            ParticipantEvent::Balance(e) => matches!(e, BalanceEvent::Refunded { .. }),
            ParticipantEvent::Order(e) => matches!(e, OrderEvent::Cancelled { .. }),
            ParticipantEvent::Step(e) => matches!(e, StepEvent::NullCompensated),
            ParticipantEvent::Consumer(_) => false,
        }
    }
}

macro_rules! family {
    ($($family:ident => $variant:ident),* $(,)?) => {$(
        impl From<$family> for ParticipantEvent {
            fn from(event: $family) -> Self {
                ParticipantEvent::$variant(event)
            }
        }
    )*};
}
family!(
    StockEvent => Stock,
    CouponEvent => Coupon,
    BalanceEvent => Balance,
    OrderEvent => Order,
    StepEvent => Step,
    ConsumerEvent => Consumer,
);

/// The stored form: one variant per event, in the order they were added. Private: code uses
/// [`ParticipantEvent`].
#[derive(Clone, Serialize, Deserialize)]
enum Stored {
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
    ParkedMessageRequeued {
        body_digest: u64,
    },
    DuplicateAcknowledged {
        outcome: String,
    },
}

impl From<Stored> for ParticipantEvent {
    fn from(stored: Stored) -> Self {
        use ParticipantEvent as P;
        match stored {
            Stored::StockSeeded {
                product_id,
                available,
            } => P::Stock(StockEvent::Seeded {
                product_id,
                available,
            }),
            Stored::StockReserved { order_id, items } => P::Stock(StockEvent::Reserved { order_id, items }),
            Stored::StockReleased { order_id, items } => P::Stock(StockEvent::Released { order_id, items }),
            Stored::CouponIssued {
                coupon_id,
                owner_user_id,
                value_minor,
            } => P::Coupon(CouponEvent::Issued {
                coupon_id,
                owner_user_id,
                value_minor,
            }),
            Stored::CouponLocked {
                coupon_id,
                user_id,
                order_id,
            } => P::Coupon(CouponEvent::Locked {
                coupon_id,
                user_id,
                order_id,
            }),
            Stored::CouponUnlocked { coupon_id, order_id } => {
                P::Coupon(CouponEvent::Unlocked { coupon_id, order_id })
            }
            Stored::AccountOpened {
                user_id,
                balance_minor,
            } => P::Balance(BalanceEvent::Opened {
                user_id,
                balance_minor,
            }),
            Stored::BalanceDeducted {
                user_id,
                amount_minor,
                order_id,
            } => P::Balance(BalanceEvent::Deducted {
                user_id,
                amount_minor,
                order_id,
            }),
            Stored::BalanceRefunded {
                user_id,
                amount_minor,
                order_id,
            } => P::Balance(BalanceEvent::Refunded {
                user_id,
                amount_minor,
                order_id,
            }),
            Stored::OrderCreated {
                order_id,
                user_id,
                items,
                amount_minor,
                coupon_id,
            } => P::Order(OrderEvent::Created {
                order_id,
                user_id,
                items,
                amount_minor,
                coupon_id,
            }),
            Stored::OrderConfirmed { order_id } => P::Order(OrderEvent::Confirmed { order_id }),
            Stored::OrderCancelled { order_id } => P::Order(OrderEvent::Cancelled { order_id }),
            Stored::ActionRefused { refusal, detail } => {
                P::Step(StepEvent::ActionRefused { refusal, detail })
            }
            Stored::NullCompensated => P::Step(StepEvent::NullCompensated),
            Stored::ConsumeStarted { attempt } => P::Consumer(ConsumerEvent::Started { attempt }),
            Stored::ConsumeSucceeded { outcome } => P::Consumer(ConsumerEvent::Succeeded { outcome }),
            Stored::ConsumeFailed { tries, error } => P::Consumer(ConsumerEvent::Failed { tries, error }),
            Stored::MessageParked {
                group,
                tag,
                key,
                tries,
                error,
                body,
                parked_at_unix_ms,
            } => P::Consumer(ConsumerEvent::ParkedWholeBody {
                group,
                tag,
                key,
                tries,
                error,
                body,
                parked_at_unix_ms,
            }),
            Stored::ParkedRequeued => P::Consumer(ConsumerEvent::RequeuedWholeBody),
            Stored::MessageParkedDigest {
                group,
                tag,
                key,
                tries,
                error,
                body_prefix,
                body_len,
                body_digest,
                parked_at_unix_ms,
            } => P::Consumer(ConsumerEvent::Parked {
                group,
                tag,
                key,
                tries,
                error,
                body_prefix,
                body_len,
                body_digest,
                parked_at_unix_ms,
            }),
            Stored::ParkedMessageRequeued { body_digest } => {
                P::Consumer(ConsumerEvent::Requeued { body_digest })
            }
            Stored::DuplicateAcknowledged { outcome } => {
                P::Consumer(ConsumerEvent::DuplicateAcknowledged { outcome })
            }
        }
    }
}

impl From<ParticipantEvent> for Stored {
    fn from(event: ParticipantEvent) -> Self {
        use ParticipantEvent as P;
        match event {
            P::Stock(StockEvent::Seeded {
                product_id,
                available,
            }) => Stored::StockSeeded {
                product_id,
                available,
            },
            P::Stock(StockEvent::Reserved { order_id, items }) => Stored::StockReserved { order_id, items },
            P::Stock(StockEvent::Released { order_id, items }) => Stored::StockReleased { order_id, items },
            P::Coupon(CouponEvent::Issued {
                coupon_id,
                owner_user_id,
                value_minor,
            }) => Stored::CouponIssued {
                coupon_id,
                owner_user_id,
                value_minor,
            },
            P::Coupon(CouponEvent::Locked {
                coupon_id,
                user_id,
                order_id,
            }) => Stored::CouponLocked {
                coupon_id,
                user_id,
                order_id,
            },
            P::Coupon(CouponEvent::Unlocked { coupon_id, order_id }) => {
                Stored::CouponUnlocked { coupon_id, order_id }
            }
            P::Balance(BalanceEvent::Opened {
                user_id,
                balance_minor,
            }) => Stored::AccountOpened {
                user_id,
                balance_minor,
            },
            P::Balance(BalanceEvent::Deducted {
                user_id,
                amount_minor,
                order_id,
            }) => Stored::BalanceDeducted {
                user_id,
                amount_minor,
                order_id,
            },
            P::Balance(BalanceEvent::Refunded {
                user_id,
                amount_minor,
                order_id,
            }) => Stored::BalanceRefunded {
                user_id,
                amount_minor,
                order_id,
            },
            P::Order(OrderEvent::Created {
                order_id,
                user_id,
                items,
                amount_minor,
                coupon_id,
            }) => Stored::OrderCreated {
                order_id,
                user_id,
                items,
                amount_minor,
                coupon_id,
            },
            P::Order(OrderEvent::Confirmed { order_id }) => Stored::OrderConfirmed { order_id },
            P::Order(OrderEvent::Cancelled { order_id }) => Stored::OrderCancelled { order_id },
            P::Step(StepEvent::ActionRefused { refusal, detail }) => {
                Stored::ActionRefused { refusal, detail }
            }
            P::Step(StepEvent::NullCompensated) => Stored::NullCompensated,
            P::Consumer(ConsumerEvent::Started { attempt }) => Stored::ConsumeStarted { attempt },
            P::Consumer(ConsumerEvent::Succeeded { outcome }) => Stored::ConsumeSucceeded { outcome },
            P::Consumer(ConsumerEvent::Failed { tries, error }) => Stored::ConsumeFailed { tries, error },
            P::Consumer(ConsumerEvent::ParkedWholeBody {
                group,
                tag,
                key,
                tries,
                error,
                body,
                parked_at_unix_ms,
            }) => Stored::MessageParked {
                group,
                tag,
                key,
                tries,
                error,
                body,
                parked_at_unix_ms,
            },
            P::Consumer(ConsumerEvent::RequeuedWholeBody) => Stored::ParkedRequeued,
            P::Consumer(ConsumerEvent::Parked {
                group,
                tag,
                key,
                tries,
                error,
                body_prefix,
                body_len,
                body_digest,
                parked_at_unix_ms,
            }) => Stored::MessageParkedDigest {
                group,
                tag,
                key,
                tries,
                error,
                body_prefix,
                body_len,
                body_digest,
                parked_at_unix_ms,
            },
            P::Consumer(ConsumerEvent::Requeued { body_digest }) => {
                Stored::ParkedMessageRequeued { body_digest }
            }
            P::Consumer(ConsumerEvent::DuplicateAcknowledged { outcome }) => {
                Stored::DuplicateAcknowledged { outcome }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use saga_storage::codec;

    use super::*;
    use crate::coupon::{CouponState, CouponStatus};
    use crate::order::{OrderState, OrderStatus};
    use crate::stock::StockLevel;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// One value of every event, in the stored order, with the bytes it was first stored as
    /// and its event type. A failure here means stored logs would be misread: add new events
    /// at the end instead, and never change an existing one.
    #[test]
    fn stored_participant_events_keep_their_encoding() {
        let s = |x: &str| x.to_owned();
        let item = || Item {
            product_id: s("p"),
            quantity: 2,
        };
        let cases: Vec<ParticipantEvent> = vec![
            StockEvent::Seeded {
                product_id: s("p"),
                available: 3,
            }
            .into(),
            CouponEvent::Issued {
                coupon_id: s("c"),
                owner_user_id: s("u"),
                value_minor: 5,
            }
            .into(),
            BalanceEvent::Opened {
                user_id: s("u"),
                balance_minor: 9,
            }
            .into(),
            StockEvent::Reserved {
                order_id: s("o"),
                items: vec![item()],
            }
            .into(),
            CouponEvent::Locked {
                coupon_id: s("c"),
                user_id: s("u"),
                order_id: s("o"),
            }
            .into(),
            BalanceEvent::Deducted {
                user_id: s("u"),
                amount_minor: 4,
                order_id: s("o"),
            }
            .into(),
            OrderEvent::Created {
                order_id: s("o"),
                user_id: s("u"),
                items: vec![item()],
                amount_minor: 4,
                coupon_id: s("c"),
            }
            .into(),
            OrderEvent::Confirmed { order_id: s("o") }.into(),
            StepEvent::ActionRefused {
                refusal: Refusal::InvalidState,
                detail: s("d"),
            }
            .into(),
            StockEvent::Released {
                order_id: s("o"),
                items: vec![item()],
            }
            .into(),
            CouponEvent::Unlocked {
                coupon_id: s("c"),
                order_id: s("o"),
            }
            .into(),
            BalanceEvent::Refunded {
                user_id: s("u"),
                amount_minor: 4,
                order_id: s("o"),
            }
            .into(),
            OrderEvent::Cancelled { order_id: s("o") }.into(),
            StepEvent::NullCompensated.into(),
            ConsumerEvent::Started { attempt: 1 }.into(),
            ConsumerEvent::Succeeded { outcome: s("x") }.into(),
            ConsumerEvent::Failed {
                tries: 2,
                error: s("e"),
            }
            .into(),
            ConsumerEvent::ParkedWholeBody {
                group: s("g"),
                tag: s("t"),
                key: s("k"),
                tries: 3,
                error: s("e"),
                body: vec![1],
                parked_at_unix_ms: 6,
            }
            .into(),
            ConsumerEvent::RequeuedWholeBody.into(),
            ConsumerEvent::Parked {
                group: s("g"),
                tag: s("t"),
                key: s("k"),
                tries: 3,
                error: s("e"),
                body_prefix: vec![1],
                body_len: 1,
                body_digest: 8,
                parked_at_unix_ms: 6,
            }
            .into(),
            ConsumerEvent::Requeued { body_digest: 8 }.into(),
            ConsumerEvent::DuplicateAcknowledged { outcome: s("x") }.into(),
        ];
        let actual: Vec<String> = cases
            .iter()
            .map(|e| hex(&codec::encode(e).expect("encodes")))
            .collect();
        assert_eq!(actual, GOLDEN);
        let names: Vec<&str> = cases.iter().map(ParticipantEvent::name).collect();
        assert_eq!(names, NAMES);
        for (case, bytes) in cases.iter().zip(actual) {
            let bytes: Vec<u8> = (0..bytes.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&bytes[i..i + 2], 16).expect("hex"))
                .collect();
            assert_eq!(&codec::decode::<ParticipantEvent>(&bytes).expect("decodes"), case);
        }
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
    const NAMES: &[&str] = &[
        "StockSeeded",
        "CouponIssued",
        "AccountOpened",
        "StockReserved",
        "CouponLocked",
        "BalanceDeducted",
        "OrderCreated",
        "OrderConfirmed",
        "ActionRefused",
        "StockReleased",
        "CouponUnlocked",
        "BalanceRefunded",
        "OrderCancelled",
        "NullCompensated",
        "ConsumeStarted",
        "ConsumeSucceeded",
        "ConsumeFailed",
        "MessageParked",
        "ParkedRequeued",
        "MessageParkedDigest",
        "ParkedMessageRequeued",
        "DuplicateAcknowledged",
    ];
    const GOLDEN_MODELS: [&str; 3] = ["0204", "01750a01016f", "01750101700408016302"];
}

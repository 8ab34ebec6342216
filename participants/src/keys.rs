//! Every stream name and projection key of a participant's log, in one place.
//!
//! Streams:
//! - `step/<saga_id>/<step>`: one idempotency key (the barrier's stream);
//! - `seed/<kind>/<id>`: the seeding of one product, coupon or account;
//! - `consumer/<group>/<tag>/<saga_id>:<step>`: the consumer log of one compensation;
//! - `poison/<group>/<tag>/<transport key>`: a message that is not a valid compensation.
//!
//! Projections (values encoded with the codec): `stock/<product>`, `coupon/<id>`,
//! `balance/<user>`, `order/<id>`, and the parked list `parked/<stream>@<digest>` (older logs:
//! `parked/<stream>`). Ids never hold '/', so no key is a prefix of another kind's.

pub const STOCK_PREFIX: &str = "stock/";
pub const COUPON_PREFIX: &str = "coupon/";
pub const BALANCE_PREFIX: &str = "balance/";
pub const ORDER_PREFIX: &str = "order/";
pub const PARKED_PREFIX: &str = "parked/";

pub fn step_stream(saga_id: &str, step: &str) -> String {
    format!("step/{saga_id}/{step}")
}

/// `seed/<kind>/<id>`, `kind` one of `product`, `coupon`, `account`.
pub fn seed_stream(kind: &str, id: &str) -> String {
    format!("seed/{kind}/{id}")
}

pub fn consumer_stream(group: &str, tag: &str, key: &str) -> String {
    format!("consumer/{group}/{tag}/{key}")
}

pub fn poison_stream(group: &str, tag: &str, key: &str) -> String {
    format!("poison/{group}/{tag}/{key}")
}

pub fn stock(product_id: &str) -> String {
    format!("{STOCK_PREFIX}{product_id}")
}

pub fn coupon(coupon_id: &str) -> String {
    format!("{COUPON_PREFIX}{coupon_id}")
}

pub fn balance(user_id: &str) -> String {
    format!("{BALANCE_PREFIX}{user_id}")
}

pub fn order(order_id: &str) -> String {
    format!("{ORDER_PREFIX}{order_id}")
}

/// The parked-list key of a message parked in `stream`: `parked/<stream>@<digest, 16 hex>`.
pub fn parked(stream: &str, body_digest: u64) -> String {
    format!("{PARKED_PREFIX}{stream}@{body_digest:016x}")
}

/// The parked-list key of an entry of an older log (one per stream).
pub fn parked_whole_body(stream: &str) -> String {
    format!("{PARKED_PREFIX}{stream}")
}

/// The id after `prefix` in a projection key.
pub fn id_of<'k>(key: &'k [u8], prefix: &str) -> std::borrow::Cow<'k, str> {
    String::from_utf8_lossy(key.get(prefix.len()..).unwrap_or_default())
}

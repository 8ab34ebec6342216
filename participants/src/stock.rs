//! The stock role: how many units of each product are available and reserved.
//!
//! Events: `StockSeeded` (stream `seed/product/<id>`), `StockReserved` (a step's action) and
//! `StockReleased` (its compensation). Read model: `stock/<product>` -> [`StockLevel`].
//! Invariant kept by [`decide`] inside the append's transaction, asserted by [`apply`]: no
//! product's available or reserved count ever goes below zero, so stock is never oversold.

use saga_proto::v1 as pb;
use saga_storage::{EventLog, ProjectError, ProjectionTx};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::keys;
use crate::projector::{get, put};
use crate::record::ParticipantEvent;
use crate::refusal::{Refusal, Refused};
use crate::service::{
    barrier_status, check_id, check_ids, check_seed_len, invalid, items, other_action, read_projection,
    scan_projection, seed_one, step_key,
};

/// Units of one product in an order or a reservation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Item {
    pub product_id: String,
    pub quantity: i64,
}

/// The stock role's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StockEvent {
    Seeded { product_id: String, available: i64 },
    Reserved { order_id: String, items: Vec<Item> },
    Released { order_id: String, items: Vec<Item> },
}

impl StockEvent {
    pub fn name(&self) -> &'static str {
        match self {
            StockEvent::Seeded { .. } => "StockSeeded",
            StockEvent::Reserved { .. } => "StockReserved",
            StockEvent::Released { .. } => "StockReleased",
        }
    }

    pub fn undo(&self) -> Option<StockEvent> {
        match self {
            StockEvent::Reserved { order_id, items } => Some(StockEvent::Released {
                order_id: order_id.clone(),
                items: items.clone(),
            }),
            StockEvent::Seeded { .. } | StockEvent::Released { .. } => None,
        }
    }

    /// The products the event touches, in order.
    fn products(&self) -> Vec<&str> {
        match self {
            StockEvent::Seeded { product_id, .. } => vec![product_id],
            StockEvent::Reserved { items, .. } | StockEvent::Released { items, .. } => {
                items.iter().map(|i| i.product_id.as_str()).collect()
            }
        }
    }
}

/// `stock/<product>`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLevel {
    pub available: i64,
    pub reserved: i64,
}

/// The guard: whether `event` may apply to `levels`, the levels of its products in order
/// (`None`: not seeded). All-or-nothing: one short item refuses the whole reservation.
pub fn decide(event: &StockEvent, levels: &[Option<StockLevel>]) -> Result<(), Refused> {
    match event {
        StockEvent::Seeded { .. } => Ok(()),
        StockEvent::Reserved { items, .. } => items.iter().zip(levels).try_for_each(|(item, level)| {
            let Some(level) = level else {
                return Err(Refused::new(
                    Refusal::UnknownEntity,
                    format!("product {}", item.product_id),
                ));
            };
            if level.available < item.quantity {
                return Err(Refused::new(
                    Refusal::OutOfStock,
                    format!(
                        "product {}: {} available, {} wanted",
                        item.product_id, level.available, item.quantity
                    ),
                ));
            }
            Ok(())
        }),
        // A release follows its reservation, so the units are reserved; a log where they are
        // not is refused (the message is parked), not trusted.
        StockEvent::Released { items, .. } => items.iter().zip(levels).try_for_each(|(item, level)| {
            let reserved = level.map_or(0, |l| l.reserved);
            if reserved < item.quantity {
                return Err(Refused::new(
                    Refusal::InvalidState,
                    format!(
                        "release of {} units of {} beyond its {reserved} reserved",
                        item.quantity, item.product_id
                    ),
                ));
            }
            Ok(())
        }),
    }
}

/// Applies a decided event. Cannot fail; panics if the fold breaks its invariant (a bug).
pub fn apply(event: &StockEvent, levels: &mut [Option<StockLevel>]) {
    match event {
        StockEvent::Seeded { available, .. } => {
            levels[0] = Some(StockLevel {
                available: *available,
                reserved: 0,
            });
        }
        StockEvent::Reserved { items, .. } | StockEvent::Released { items, .. } => {
            let sign = if matches!(event, StockEvent::Reserved { .. }) {
                1
            } else {
                -1
            };
            for (item, level) in items.iter().zip(levels.iter_mut()) {
                let level = level.get_or_insert_default();
                level.available -= sign * item.quantity;
                level.reserved += sign * item.quantity;
                assert!(
                    level.available >= 0 && level.reserved >= 0,
                    "stock of {} went negative: {level:?}",
                    item.product_id
                );
            }
        }
    }
}

pub(crate) fn project(event: &StockEvent, tx: &mut ProjectionTx<'_>) -> Result<(), ProjectError> {
    let keys: Vec<String> = event.products().into_iter().map(keys::stock).collect();
    let mut levels = keys.iter().map(|k| get(tx, k)).collect::<Result<Vec<_>, _>>()?;
    decide(event, &levels).map_err(ProjectError::refused)?;
    apply(event, &mut levels);
    for (key, level) in keys.iter().zip(&levels) {
        put(tx, key, level.as_ref())?;
    }
    Ok(())
}

/// `saga.v1.StockService`.
#[derive(Clone)]
pub struct StockService {
    pub(crate) log: EventLog,
    pub(crate) barrier: std::sync::Arc<dyn crate::barrier::Barrier>,
    /// Admits the seed call (`saga_proto::auth`).
    pub(crate) admin: saga_proto::auth::AdminToken,
}

impl StockService {
    async fn stock_of(&self, product_id: &str) -> Result<Option<pb::ProductStock>, Status> {
        Ok(read_projection::<StockLevel>(&self.log, &keys::stock(product_id))
            .await?
            .map(|level| to_proto(product_id.to_owned(), level)))
    }
}

fn to_proto(product_id: String, level: StockLevel) -> pb::ProductStock {
    pb::ProductStock {
        product_id,
        available: level.available,
        reserved: level.reserved,
    }
}

#[tonic::async_trait]
impl pb::stock_service_server::StockService for StockService {
    async fn reserve_stock(
        &self,
        request: Request<pb::ReserveStockRequest>,
    ) -> Result<Response<pb::ReserveStockResponse>, Status> {
        let r = request.into_inner();
        let key = step_key(r.key)?;
        check_id("order_id", &r.order_id)?;
        let items = items(r.items)?;
        let action = StockEvent::Reserved {
            order_id: r.order_id,
            items,
        };
        let (done, replayed) = self
            .barrier
            .act(&key, action.into())
            .await
            .map_err(barrier_status)?;
        let ParticipantEvent::Stock(StockEvent::Reserved { items, .. }) = done else {
            return Err(other_action(&key));
        };
        let mut stock = Vec::with_capacity(items.len());
        for item in &items {
            stock.extend(self.stock_of(&item.product_id).await?);
        }
        Ok(Response::new(pb::ReserveStockResponse { stock, replayed }))
    }

    async fn get_stock(
        &self,
        request: Request<pb::GetStockRequest>,
    ) -> Result<Response<pb::GetStockResponse>, Status> {
        let ids = request.into_inner().product_ids;
        check_ids("product_ids", &ids)?;
        let mut stock = Vec::new();
        if ids.is_empty() {
            for (id, level) in scan_projection::<StockLevel>(&self.log, keys::STOCK_PREFIX).await? {
                stock.push(to_proto(id, level));
            }
        } else {
            for id in &ids {
                stock.extend(self.stock_of(id).await?);
            }
        }
        Ok(Response::new(pb::GetStockResponse { stock }))
    }

    async fn seed_stock(
        &self,
        request: Request<pb::SeedStockRequest>,
    ) -> Result<Response<pb::SeedStockResponse>, Status> {
        self.admin.check(request.metadata())?;
        let entries = request.into_inner().stock;
        check_seed_len("stock", entries.len())?;
        for (i, e) in entries.iter().enumerate() {
            check_id(&format!("stock[{i}].product_id"), &e.product_id)?;
            if e.available < 0 {
                return Err(invalid(&format!("stock[{i}].available"), "must not be negative"));
            }
            if e.reserved != 0 {
                return Err(invalid(&format!("stock[{i}].reserved"), "must be 0 when seeding"));
            }
        }
        let mut seeded = 0;
        for e in entries {
            let stream = keys::seed_stream("product", &e.product_id);
            let event = StockEvent::Seeded {
                product_id: e.product_id,
                available: e.available,
            };
            seeded += u32::from(seed_one(&self.log, stream, event.into()).await?);
        }
        Ok(Response::new(pb::SeedStockResponse { seeded }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(quantity: i64) -> Item {
        Item {
            product_id: "p".into(),
            quantity,
        }
    }

    #[test]
    fn a_reservation_past_the_available_units_is_refused_and_changes_nothing() {
        let levels = [Some(StockLevel {
            available: 2,
            reserved: 0,
        })];
        let reserve = |q| StockEvent::Reserved {
            order_id: "o".into(),
            items: vec![item(q)],
        };
        let refused = decide(&reserve(3), &levels).expect_err("3 of 2");
        assert_eq!(refused.reason, Refusal::OutOfStock);
        decide(&reserve(2), &levels).expect("2 of 2");
        let mut after = levels;
        apply(&reserve(2), &mut after);
        assert_eq!(
            after[0],
            Some(StockLevel {
                available: 0,
                reserved: 2
            })
        );
        let release = StockEvent::Released {
            order_id: "o".into(),
            items: vec![item(3)],
        };
        assert_eq!(
            decide(&release, &after).expect_err("3 of 2 reserved").reason,
            Refusal::InvalidState
        );
    }
}

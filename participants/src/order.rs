//! The order role: each order and its status (pending -> confirmed | cancelled).
//!
//! Events: `OrderCreated` (the first step's action), `OrderConfirmed` (the last step's action,
//! the saga's pivot: never undone) and `OrderCancelled` (the creation's compensation). Read
//! model: `order/<id>` -> [`OrderState`]. Invariant kept by [`decide`]: an order is created
//! once, and only a pending order is confirmed or cancelled.

use saga_proto::v1 as pb;
use saga_storage::{EventLog, ProjectError, ProjectionTx};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::keys;
use crate::projector::{get, put};
use crate::record::ParticipantEvent;
use crate::refusal::{Refusal, Refused};
use crate::service::{
    barrier_status, check_id, check_ids, check_positive, items, other_action, read_projection, step_key,
};
use crate::stock::Item;

/// The order role's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderEvent {
    Created {
        order_id: String,
        user_id: String,
        items: Vec<Item>,
        amount_minor: i64,
        coupon_id: String,
    },
    Confirmed {
        order_id: String,
    },
    Cancelled {
        order_id: String,
    },
}

impl OrderEvent {
    pub fn name(&self) -> &'static str {
        match self {
            OrderEvent::Created { .. } => "OrderCreated",
            OrderEvent::Confirmed { .. } => "OrderConfirmed",
            OrderEvent::Cancelled { .. } => "OrderCancelled",
        }
    }

    /// A confirmation is not undoable (the pivot): compensating it is a null compensation.
    pub fn undo(&self) -> Option<OrderEvent> {
        match self {
            OrderEvent::Created { order_id, .. } => Some(OrderEvent::Cancelled {
                order_id: order_id.clone(),
            }),
            OrderEvent::Confirmed { .. } | OrderEvent::Cancelled { .. } => None,
        }
    }

    fn order_id(&self) -> &str {
        match self {
            OrderEvent::Created { order_id, .. }
            | OrderEvent::Confirmed { order_id }
            | OrderEvent::Cancelled { order_id } => order_id,
        }
    }
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

/// The guard: whether `event` may apply to the order (`None`: not created).
pub fn decide(event: &OrderEvent, order: Option<&OrderState>) -> Result<(), Refused> {
    let order_id = event.order_id();
    match (event, order) {
        (OrderEvent::Created { .. }, None) => Ok(()),
        (OrderEvent::Created { .. }, Some(_)) => Err(Refused::new(
            Refusal::InvalidState,
            format!("order {order_id} exists already"),
        )),
        (OrderEvent::Confirmed { .. } | OrderEvent::Cancelled { .. }, None) => {
            Err(Refused::new(Refusal::UnknownEntity, format!("order {order_id}")))
        }
        (_, Some(o)) if o.status == OrderStatus::Pending => Ok(()),
        (OrderEvent::Confirmed { .. }, Some(o)) => Err(Refused::new(
            Refusal::InvalidState,
            format!("order {order_id} is {:?}", o.status),
        )),
        // The saga never compensates past its pivot; a message that asks for it is refused
        // (and parked), the order stays confirmed.
        (OrderEvent::Cancelled { .. }, Some(o)) => Err(Refused::new(
            Refusal::InvalidState,
            format!(
                "order {order_id} is {:?}; only a pending order is cancelled",
                o.status
            ),
        )),
    }
}

/// Applies a decided event. Cannot fail; panics if the fold breaks its invariant (a bug).
pub fn apply(event: &OrderEvent, order: &mut Option<OrderState>) {
    let next = match event {
        OrderEvent::Created {
            user_id,
            items,
            amount_minor,
            coupon_id,
            ..
        } => {
            assert!(order.is_none(), "an order is created once");
            *order = Some(OrderState {
                user_id: user_id.clone(),
                items: items.clone(),
                amount_minor: *amount_minor,
                coupon_id: coupon_id.clone(),
                status: OrderStatus::Pending,
            });
            return;
        }
        OrderEvent::Confirmed { .. } => OrderStatus::Confirmed,
        OrderEvent::Cancelled { .. } => OrderStatus::Cancelled,
    };
    let o = order.as_mut().expect("the order exists (decided)");
    assert_eq!(
        o.status,
        OrderStatus::Pending,
        "only a pending order changes status"
    );
    o.status = next;
}

pub(crate) fn project(event: &OrderEvent, tx: &mut ProjectionTx<'_>) -> Result<(), ProjectError> {
    let key = keys::order(event.order_id());
    let mut order = get::<OrderState>(tx, &key)?;
    decide(event, order.as_ref()).map_err(ProjectError::refused)?;
    apply(event, &mut order);
    put(tx, &key, order.as_ref())
}

/// `saga.v1.OrderService`.
#[derive(Clone)]
pub struct OrderService {
    pub(crate) log: EventLog,
    pub(crate) barrier: std::sync::Arc<dyn crate::barrier::Barrier>,
}

impl OrderService {
    async fn order(&self, order_id: &str) -> Result<Option<pb::Order>, Status> {
        Ok(read_projection::<OrderState>(&self.log, &keys::order(order_id))
            .await?
            .map(|o| pb::Order {
                order_id: order_id.to_owned(),
                user_id: o.user_id,
                items: o
                    .items
                    .into_iter()
                    .map(|i| pb::OrderItem {
                        product_id: i.product_id,
                        quantity: i.quantity,
                    })
                    .collect(),
                amount_minor: o.amount_minor,
                coupon_id: o.coupon_id,
                status: match o.status {
                    OrderStatus::Pending => pb::OrderStatus::Pending,
                    OrderStatus::Confirmed => pb::OrderStatus::Confirmed,
                    OrderStatus::Cancelled => pb::OrderStatus::Cancelled,
                } as i32,
            }))
    }
}

#[tonic::async_trait]
impl pb::order_service_server::OrderService for OrderService {
    async fn create_order(
        &self,
        request: Request<pb::CreateOrderRequest>,
    ) -> Result<Response<pb::CreateOrderResponse>, Status> {
        let r = request.into_inner();
        let key = step_key(r.key)?;
        check_id("order_id", &r.order_id)?;
        check_id("user_id", &r.user_id)?;
        let items = items(r.items)?;
        check_positive("amount_minor", r.amount_minor)?;
        if !r.coupon_id.is_empty() {
            check_id("coupon_id", &r.coupon_id)?;
        }
        let action = OrderEvent::Created {
            order_id: r.order_id,
            user_id: r.user_id,
            items,
            amount_minor: r.amount_minor,
            coupon_id: r.coupon_id,
        };
        let (done, replayed) = self
            .barrier
            .act(&key, action.into())
            .await
            .map_err(barrier_status)?;
        let ParticipantEvent::Order(OrderEvent::Created { order_id, .. }) = done else {
            return Err(other_action(&key));
        };
        Ok(Response::new(pb::CreateOrderResponse {
            order: self.order(&order_id).await?,
            replayed,
        }))
    }

    async fn confirm_order(
        &self,
        request: Request<pb::ConfirmOrderRequest>,
    ) -> Result<Response<pb::ConfirmOrderResponse>, Status> {
        let r = request.into_inner();
        let key = step_key(r.key)?;
        check_id("order_id", &r.order_id)?;
        let action = OrderEvent::Confirmed { order_id: r.order_id };
        let (done, replayed) = self
            .barrier
            .act(&key, action.into())
            .await
            .map_err(barrier_status)?;
        let ParticipantEvent::Order(OrderEvent::Confirmed { order_id }) = done else {
            return Err(other_action(&key));
        };
        Ok(Response::new(pb::ConfirmOrderResponse {
            order: self.order(&order_id).await?,
            replayed,
        }))
    }

    async fn get_orders(
        &self,
        request: Request<pb::GetOrdersRequest>,
    ) -> Result<Response<pb::GetOrdersResponse>, Status> {
        let ids = request.into_inner().order_ids;
        check_ids("order_ids", &ids)?;
        let mut orders = Vec::new();
        for id in &ids {
            orders.extend(self.order(id).await?);
        }
        Ok(Response::new(pb::GetOrdersResponse { orders }))
    }
}

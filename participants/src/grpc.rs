//! The participants' gRPC services (`saga.v1`): validation, barrier calls, status mapping.
//!
//! Status codes: INVALID_ARGUMENT names the field and changes nothing; FAILED_PRECONDITION is
//! a business refusal with a `BusinessRefusal` in the status details; UNAVAILABLE means "try
//! again" (storage busy or failing); ALREADY_EXISTS for conflicting seeds.

use std::collections::HashSet;

use prost::Message as _;
use saga_proto::v1 as pb;
use saga_storage::{AppendRequest, EventLog, ExpectedVersion, NewEvent, StorageError, codec};
use tonic::{Request, Response, Status};

use crate::barrier::{self, BarrierError, StepKey};
use crate::events::{
    CouponState, CouponStatus, Item, OrderState, OrderStatus, ParticipantEvent, StockLevel, balance_key,
    coupon_key, order_key, stock_key,
};

/// Most items in one order or reservation.
pub const ITEMS_MAX: usize = 64;
/// Most ids in one read call.
pub const READ_IDS_MAX: usize = 1000;
/// Most entries in one seed call.
pub const SEED_LEN_MAX: usize = 10_000;

fn invalid(field: &str, reason: &str) -> Status {
    Status::invalid_argument(format!("{field}: {reason}"))
}

/// An id used in stream names and projection keys: 1..=64 bytes, printable ASCII, no '/'.
fn check_id(field: &str, value: &str) -> Result<(), Status> {
    crate::barrier::check_key_part(value).map_err(|why| invalid(field, &why))
}

fn check_positive(field: &str, value: i64) -> Result<(), Status> {
    if value <= 0 {
        return Err(invalid(field, "must be positive"));
    }
    Ok(())
}

fn step_key(key: Option<pb::StepKey>) -> Result<StepKey, Status> {
    let key = key.ok_or_else(|| invalid("key", "required"))?;
    let key = StepKey {
        saga_id: key.saga_id,
        step: key.step,
    };
    key.validate().map_err(|(field, why)| invalid(field, &why))?;
    Ok(key)
}

fn items(items: Vec<pb::OrderItem>) -> Result<Vec<Item>, Status> {
    if items.is_empty() || items.len() > ITEMS_MAX {
        return Err(invalid("items", &format!("1..={ITEMS_MAX} items")));
    }
    let mut seen = HashSet::new();
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            check_id(&format!("items[{i}].product_id"), &item.product_id)?;
            check_positive(&format!("items[{i}].quantity"), item.quantity)?;
            if !seen.insert(item.product_id.clone()) {
                return Err(invalid(&format!("items[{i}].product_id"), "appears twice"));
            }
            Ok(Item {
                product_id: item.product_id,
                quantity: item.quantity,
            })
        })
        .collect()
}

fn check_ids(field: &str, ids: &[String]) -> Result<(), Status> {
    if ids.len() > READ_IDS_MAX {
        return Err(invalid(field, &format!("at most {READ_IDS_MAX} ids")));
    }
    ids.iter()
        .enumerate()
        .try_for_each(|(i, id)| check_id(&format!("{field}[{i}]"), id))
}

fn storage_status(error: StorageError) -> Status {
    Status::unavailable(format!("storage: {error}"))
}

fn barrier_status(error: BarrierError) -> Status {
    match error {
        BarrierError::Refused(refusal, detail) => {
            let details = pb::BusinessRefusal {
                reason: refusal.to_proto() as i32,
                detail: detail.clone(),
            }
            .encode_to_vec();
            Status::with_details(
                tonic::Code::FailedPrecondition,
                format!("{}: {detail}", refusal.code()),
                details.into(),
            )
        }
        BarrierError::Storage(e) => storage_status(e),
        BarrierError::Contended(stream) => Status::unavailable(format!("contended: {stream}")),
    }
}

async fn read_projection<T: serde::de::DeserializeOwned>(
    log: &EventLog,
    key: &str,
) -> Result<Option<T>, Status> {
    match log.projection_get(key).await.map_err(storage_status)? {
        Some(bytes) => {
            Ok(Some(codec::decode(&bytes).map_err(|e| {
                Status::internal(format!("projection {key}: {e}"))
            })?))
        }
        None => Ok(None),
    }
}

/// Seeds one entity through its own stream: new -> seeded; identical -> no-op; different ->
/// ALREADY_EXISTS. Returns whether it was new.
async fn seed_one(log: &EventLog, stream: String, event: ParticipantEvent) -> Result<bool, Status> {
    let new = NewEvent::encode(event.name(), &event).map_err(storage_status)?;
    match log
        .append(AppendRequest::new(&stream, ExpectedVersion::NoStream).event(new))
        .await
    {
        Ok(_) => Ok(true),
        Err(StorageError::VersionConflict { .. }) => {
            let existing = log.read_stream(&stream, 1, 1).await.map_err(storage_status)?;
            let same = existing
                .first()
                .map(|r| r.decode::<ParticipantEvent>())
                .transpose()
                .map_err(storage_status)?
                .is_some_and(|e| e == event);
            if same {
                Ok(false)
            } else {
                Err(Status::already_exists(format!(
                    "{stream} was seeded with other values"
                )))
            }
        }
        Err(e) => Err(storage_status(e)),
    }
}

fn check_seed_len(field: &str, len: usize) -> Result<(), Status> {
    if len > SEED_LEN_MAX {
        return Err(invalid(field, &format!("at most {SEED_LEN_MAX} entries")));
    }
    Ok(())
}

// ------------------------------------------------------------------------------------ stock

/// `saga.v1.StockService`.
#[derive(Clone)]
pub struct StockService {
    pub(crate) log: EventLog,
}

impl StockService {
    async fn stock_of(&self, product_id: &str) -> Result<Option<pb::ProductStock>, Status> {
        Ok(read_projection::<StockLevel>(&self.log, &stock_key(product_id))
            .await?
            .map(|level| pb::ProductStock {
                product_id: product_id.to_owned(),
                available: level.available,
                reserved: level.reserved,
            }))
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
        let action = ParticipantEvent::StockReserved {
            order_id: r.order_id,
            items,
        };
        let (done, replayed) = barrier::act(&self.log, &key, action)
            .await
            .map_err(barrier_status)?;
        let ParticipantEvent::StockReserved { items, .. } = done else {
            return Err(Status::internal(format!(
                "step {} holds another action",
                key.stream()
            )));
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
            for (key, value) in self
                .log
                .projection_scan_prefix("stock/", None, READ_IDS_MAX)
                .await
                .map_err(storage_status)?
            {
                let level: StockLevel = codec::decode(&value).map_err(|e| Status::internal(e.to_string()))?;
                stock.push(pb::ProductStock {
                    product_id: String::from_utf8_lossy(&key["stock/".len()..]).into_owned(),
                    available: level.available,
                    reserved: level.reserved,
                });
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
            let event = ParticipantEvent::StockSeeded {
                product_id: e.product_id.clone(),
                available: e.available,
            };
            seeded += u32::from(seed_one(&self.log, format!("seed/product/{}", e.product_id), event).await?);
        }
        Ok(Response::new(pb::SeedStockResponse { seeded }))
    }
}

// ----------------------------------------------------------------------------------- coupon

/// `saga.v1.CouponService`.
#[derive(Clone)]
pub struct CouponService {
    pub(crate) log: EventLog,
}

fn coupon_to_proto(coupon_id: &str, c: CouponState) -> pb::Coupon {
    pb::Coupon {
        coupon_id: coupon_id.to_owned(),
        owner_user_id: c.owner_user_id,
        value_minor: c.value_minor,
        status: match c.status {
            CouponStatus::Free => pb::CouponStatus::Free,
            CouponStatus::Locked => pb::CouponStatus::Locked,
        } as i32,
        locked_by_order_id: c.locked_by_order_id,
    }
}

#[tonic::async_trait]
impl pb::coupon_service_server::CouponService for CouponService {
    async fn lock_coupon(
        &self,
        request: Request<pb::LockCouponRequest>,
    ) -> Result<Response<pb::LockCouponResponse>, Status> {
        let r = request.into_inner();
        let key = step_key(r.key)?;
        check_id("coupon_id", &r.coupon_id)?;
        check_id("user_id", &r.user_id)?;
        check_id("order_id", &r.order_id)?;
        let action = ParticipantEvent::CouponLocked {
            coupon_id: r.coupon_id,
            user_id: r.user_id,
            order_id: r.order_id,
        };
        let (done, replayed) = barrier::act(&self.log, &key, action)
            .await
            .map_err(barrier_status)?;
        let ParticipantEvent::CouponLocked { coupon_id, .. } = done else {
            return Err(Status::internal(format!(
                "step {} holds another action",
                key.stream()
            )));
        };
        let coupon = read_projection::<CouponState>(&self.log, &coupon_key(&coupon_id))
            .await?
            .map(|c| coupon_to_proto(&coupon_id, c));
        Ok(Response::new(pb::LockCouponResponse { coupon, replayed }))
    }

    async fn get_coupons(
        &self,
        request: Request<pb::GetCouponsRequest>,
    ) -> Result<Response<pb::GetCouponsResponse>, Status> {
        let ids = request.into_inner().coupon_ids;
        check_ids("coupon_ids", &ids)?;
        let mut coupons = Vec::new();
        for id in &ids {
            if let Some(c) = read_projection::<CouponState>(&self.log, &coupon_key(id)).await? {
                coupons.push(coupon_to_proto(id, c));
            }
        }
        Ok(Response::new(pb::GetCouponsResponse { coupons }))
    }

    async fn seed_coupons(
        &self,
        request: Request<pb::SeedCouponsRequest>,
    ) -> Result<Response<pb::SeedCouponsResponse>, Status> {
        let coupons = request.into_inner().coupons;
        check_seed_len("coupons", coupons.len())?;
        for (i, c) in coupons.iter().enumerate() {
            check_id(&format!("coupons[{i}].coupon_id"), &c.coupon_id)?;
            check_id(&format!("coupons[{i}].owner_user_id"), &c.owner_user_id)?;
            check_positive(&format!("coupons[{i}].value_minor"), c.value_minor)?;
            if c.status != pb::CouponStatus::Free as i32 && c.status != pb::CouponStatus::Unspecified as i32 {
                return Err(invalid(
                    &format!("coupons[{i}].status"),
                    "must be FREE when seeding",
                ));
            }
        }
        let mut seeded = 0;
        for c in coupons {
            let event = ParticipantEvent::CouponIssued {
                coupon_id: c.coupon_id.clone(),
                owner_user_id: c.owner_user_id,
                value_minor: c.value_minor,
            };
            seeded += u32::from(seed_one(&self.log, format!("seed/coupon/{}", c.coupon_id), event).await?);
        }
        Ok(Response::new(pb::SeedCouponsResponse { seeded }))
    }
}

// ---------------------------------------------------------------------------------- balance

/// `saga.v1.BalanceService`.
#[derive(Clone)]
pub struct BalanceService {
    pub(crate) log: EventLog,
}

#[tonic::async_trait]
impl pb::balance_service_server::BalanceService for BalanceService {
    async fn deduct_balance(
        &self,
        request: Request<pb::DeductBalanceRequest>,
    ) -> Result<Response<pb::DeductBalanceResponse>, Status> {
        let r = request.into_inner();
        let key = step_key(r.key)?;
        check_id("user_id", &r.user_id)?;
        check_positive("amount_minor", r.amount_minor)?;
        check_id("order_id", &r.order_id)?;
        let action = ParticipantEvent::BalanceDeducted {
            user_id: r.user_id,
            amount_minor: r.amount_minor,
            order_id: r.order_id,
        };
        let (done, replayed) = barrier::act(&self.log, &key, action)
            .await
            .map_err(barrier_status)?;
        let ParticipantEvent::BalanceDeducted { user_id, .. } = done else {
            return Err(Status::internal(format!(
                "step {} holds another action",
                key.stream()
            )));
        };
        let balance_minor = read_projection::<i64>(&self.log, &balance_key(&user_id))
            .await?
            .unwrap_or(0);
        Ok(Response::new(pb::DeductBalanceResponse {
            account: Some(pb::Account {
                user_id,
                balance_minor,
            }),
            replayed,
        }))
    }

    async fn get_balances(
        &self,
        request: Request<pb::GetBalancesRequest>,
    ) -> Result<Response<pb::GetBalancesResponse>, Status> {
        let ids = request.into_inner().user_ids;
        check_ids("user_ids", &ids)?;
        let mut accounts = Vec::new();
        if ids.is_empty() {
            for (key, value) in self
                .log
                .projection_scan_prefix("balance/", None, READ_IDS_MAX)
                .await
                .map_err(storage_status)?
            {
                accounts.push(pb::Account {
                    user_id: String::from_utf8_lossy(&key["balance/".len()..]).into_owned(),
                    balance_minor: codec::decode(&value).map_err(|e| Status::internal(e.to_string()))?,
                });
            }
        } else {
            for id in &ids {
                if let Some(balance_minor) = read_projection::<i64>(&self.log, &balance_key(id)).await? {
                    accounts.push(pb::Account {
                        user_id: id.clone(),
                        balance_minor,
                    });
                }
            }
        }
        Ok(Response::new(pb::GetBalancesResponse { accounts }))
    }

    async fn seed_balances(
        &self,
        request: Request<pb::SeedBalancesRequest>,
    ) -> Result<Response<pb::SeedBalancesResponse>, Status> {
        let accounts = request.into_inner().accounts;
        check_seed_len("accounts", accounts.len())?;
        for (i, a) in accounts.iter().enumerate() {
            check_id(&format!("accounts[{i}].user_id"), &a.user_id)?;
            if a.balance_minor < 0 {
                return Err(invalid(
                    &format!("accounts[{i}].balance_minor"),
                    "must not be negative",
                ));
            }
        }
        let mut seeded = 0;
        for a in accounts {
            let event = ParticipantEvent::AccountOpened {
                user_id: a.user_id.clone(),
                balance_minor: a.balance_minor,
            };
            seeded += u32::from(seed_one(&self.log, format!("seed/account/{}", a.user_id), event).await?);
        }
        Ok(Response::new(pb::SeedBalancesResponse { seeded }))
    }
}

// ------------------------------------------------------------------------------------ order

/// `saga.v1.OrderService`.
#[derive(Clone)]
pub struct OrderService {
    pub(crate) log: EventLog,
}

impl OrderService {
    async fn order(&self, order_id: &str) -> Result<Option<pb::Order>, Status> {
        Ok(read_projection::<OrderState>(&self.log, &order_key(order_id))
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
        let action = ParticipantEvent::OrderCreated {
            order_id: r.order_id,
            user_id: r.user_id,
            items,
            amount_minor: r.amount_minor,
            coupon_id: r.coupon_id,
        };
        let (done, replayed) = barrier::act(&self.log, &key, action)
            .await
            .map_err(barrier_status)?;
        let ParticipantEvent::OrderCreated { order_id, .. } = done else {
            return Err(Status::internal(format!(
                "step {} holds another action",
                key.stream()
            )));
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
        let action = ParticipantEvent::OrderConfirmed { order_id: r.order_id };
        let (done, replayed) = barrier::act(&self.log, &key, action)
            .await
            .map_err(barrier_status)?;
        let ParticipantEvent::OrderConfirmed { order_id } = done else {
            return Err(Status::internal(format!(
                "step {} holds another action",
                key.stream()
            )));
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

// ------------------------------------------------------------------------- consumer admin

/// `saga.v1.ConsumerAdmin`: the compensation consumer's parked messages.
#[derive(Clone)]
pub struct ConsumerAdminService {
    pub(crate) consumer: Option<std::sync::Arc<crate::consumer::CompensationConsumer>>,
}

impl ConsumerAdminService {
    fn consumer(&self) -> Result<&crate::consumer::CompensationConsumer, Status> {
        self.consumer
            .as_deref()
            .ok_or_else(|| Status::failed_precondition("no compensation consumer runs in this process"))
    }
}

/// Most parked messages per page.
const PARKED_PAGE_MAX: u32 = 1000;

#[tonic::async_trait]
impl pb::consumer_admin_server::ConsumerAdmin for ConsumerAdminService {
    async fn list_parked(
        &self,
        request: Request<pb::ListParkedRequest>,
    ) -> Result<Response<pb::ListParkedResponse>, Status> {
        let r = request.into_inner();
        let page_size = match r.page_size {
            0 => 100,
            n if n > PARKED_PAGE_MAX => return Err(invalid("page_size", &format!("1..={PARKED_PAGE_MAX}"))),
            n => n,
        };
        let after = (!r.page_token.is_empty()).then_some(r.page_token.as_str());
        let parked = self
            .consumer()?
            .parked(after, page_size as usize)
            .await
            .map_err(Status::unavailable)?;
        let next_page_token = if parked.len() == page_size as usize {
            parked.last().map(|p| p.log_key.clone()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListParkedResponse {
            parked,
            next_page_token,
        }))
    }

    async fn requeue_parked(
        &self,
        request: Request<pb::RequeueParkedRequest>,
    ) -> Result<Response<pb::RequeueParkedResponse>, Status> {
        let log_key = request.into_inner().log_key;
        if log_key.is_empty() || log_key.len() > 512 {
            return Err(invalid("log_key", "1..=512 bytes"));
        }
        match self
            .consumer()?
            .requeue(&log_key)
            .await
            .map_err(Status::unavailable)?
        {
            Some(message) => Ok(Response::new(pb::RequeueParkedResponse {
                message: Some(message),
            })),
            None => Err(Status::not_found(format!("no parked message {log_key}"))),
        }
    }
}

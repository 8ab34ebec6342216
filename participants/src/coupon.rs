//! The coupon role: who owns each coupon and which order holds it.
//!
//! Events: `CouponIssued` (stream `seed/coupon/<id>`), `CouponLocked` (a step's action) and
//! `CouponUnlocked` (its compensation). Read model: `coupon/<id>` -> [`CouponState`].
//! Invariant kept by [`decide`] inside the append's transaction: a coupon is locked by at most
//! one order at a time, only by its owner, and unlocked only by the order that locked it.

use saga_proto::v1 as pb;
use saga_storage::{EventLog, ProjectError, ProjectionTx};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};

use crate::keys;
use crate::projector::{get, put};
use crate::record::ParticipantEvent;
use crate::refusal::{Refusal, Refused};
use crate::service::{
    barrier_status, check_id, check_ids, check_positive, check_seed_len, invalid, other_action,
    read_projection, seed_one, step_key,
};

/// The coupon role's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CouponEvent {
    Issued {
        coupon_id: String,
        owner_user_id: String,
        value_minor: i64,
    },
    Locked {
        coupon_id: String,
        user_id: String,
        order_id: String,
    },
    Unlocked {
        coupon_id: String,
        order_id: String,
    },
}

impl CouponEvent {
    pub fn name(&self) -> &'static str {
        match self {
            CouponEvent::Issued { .. } => "CouponIssued",
            CouponEvent::Locked { .. } => "CouponLocked",
            CouponEvent::Unlocked { .. } => "CouponUnlocked",
        }
    }

    pub fn undo(&self) -> Option<CouponEvent> {
        match self {
            CouponEvent::Locked {
                coupon_id, order_id, ..
            } => Some(CouponEvent::Unlocked {
                coupon_id: coupon_id.clone(),
                order_id: order_id.clone(),
            }),
            CouponEvent::Issued { .. } | CouponEvent::Unlocked { .. } => None,
        }
    }

    fn coupon_id(&self) -> &str {
        match self {
            CouponEvent::Issued { coupon_id, .. }
            | CouponEvent::Locked { coupon_id, .. }
            | CouponEvent::Unlocked { coupon_id, .. } => coupon_id,
        }
    }
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

/// The guard: whether `event` may apply to the coupon (`None`: not issued).
pub fn decide(event: &CouponEvent, coupon: Option<&CouponState>) -> Result<(), Refused> {
    match event {
        CouponEvent::Issued { .. } => Ok(()),
        CouponEvent::Locked {
            coupon_id, user_id, ..
        } => match coupon {
            None => Err(Refused::new(
                Refusal::CouponNotFree,
                format!("coupon {coupon_id} does not exist"),
            )),
            Some(c) if c.status != CouponStatus::Free || c.owner_user_id != *user_id => Err(Refused::new(
                Refusal::CouponNotFree,
                format!(
                    "coupon {coupon_id} is {:?} and owned by {}",
                    c.status, c.owner_user_id
                ),
            )),
            Some(_) => Ok(()),
        },
        CouponEvent::Unlocked { coupon_id, order_id } => match coupon {
            None => Err(Refused::new(
                Refusal::UnknownEntity,
                format!("coupon {coupon_id}"),
            )),
            Some(c) if c.status != CouponStatus::Locked || c.locked_by_order_id != *order_id => {
                Err(Refused::new(
                    Refusal::InvalidState,
                    format!(
                        "coupon {coupon_id} is {:?} by {:?}, not locked by order {order_id}",
                        c.status, c.locked_by_order_id
                    ),
                ))
            }
            Some(_) => Ok(()),
        },
    }
}

/// Applies a decided event. Cannot fail; panics if the fold breaks its invariant (a bug).
pub fn apply(event: &CouponEvent, coupon: &mut Option<CouponState>) {
    match event {
        CouponEvent::Issued {
            owner_user_id,
            value_minor,
            ..
        } => {
            *coupon = Some(CouponState {
                owner_user_id: owner_user_id.clone(),
                value_minor: *value_minor,
                status: CouponStatus::Free,
                locked_by_order_id: String::new(),
            });
        }
        CouponEvent::Locked { order_id, .. } => {
            let c = coupon.as_mut().expect("a locked coupon exists (decided)");
            assert_eq!(c.status, CouponStatus::Free, "a coupon is locked once");
            c.status = CouponStatus::Locked;
            c.locked_by_order_id = order_id.clone();
        }
        CouponEvent::Unlocked { order_id, .. } => {
            let c = coupon.as_mut().expect("an unlocked coupon exists (decided)");
            assert!(
                c.status == CouponStatus::Locked && c.locked_by_order_id == *order_id,
                "a coupon is unlocked by the order that locked it"
            );
            c.status = CouponStatus::Free;
            c.locked_by_order_id.clear();
        }
    }
}

pub(crate) fn project(event: &CouponEvent, tx: &mut ProjectionTx<'_>) -> Result<(), ProjectError> {
    let key = keys::coupon(event.coupon_id());
    let mut coupon = get::<CouponState>(tx, &key)?;
    decide(event, coupon.as_ref()).map_err(ProjectError::refused)?;
    apply(event, &mut coupon);
    put(tx, &key, coupon.as_ref())
}

/// `saga.v1.CouponService`.
#[derive(Clone)]
pub struct CouponService {
    pub(crate) log: EventLog,
    pub(crate) barrier: std::sync::Arc<dyn crate::barrier::Barrier>,
    /// Admits the seed call (`saga_proto::auth`).
    pub(crate) admin: saga_proto::auth::AdminToken,
}

fn to_proto(coupon_id: &str, c: CouponState) -> pb::Coupon {
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
        let action = CouponEvent::Locked {
            coupon_id: r.coupon_id,
            user_id: r.user_id,
            order_id: r.order_id,
        };
        let (done, replayed) = self
            .barrier
            .act(&key, action.into())
            .await
            .map_err(barrier_status)?;
        let ParticipantEvent::Coupon(CouponEvent::Locked { coupon_id, .. }) = done else {
            return Err(other_action(&key));
        };
        let coupon = read_projection::<CouponState>(&self.log, &keys::coupon(&coupon_id))
            .await?
            .map(|c| to_proto(&coupon_id, c));
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
            if let Some(c) = read_projection::<CouponState>(&self.log, &keys::coupon(id)).await? {
                coupons.push(to_proto(id, c));
            }
        }
        Ok(Response::new(pb::GetCouponsResponse { coupons }))
    }

    async fn seed_coupons(
        &self,
        request: Request<pb::SeedCouponsRequest>,
    ) -> Result<Response<pb::SeedCouponsResponse>, Status> {
        self.admin.check(request.metadata())?;
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
            let stream = keys::seed_stream("coupon", &c.coupon_id);
            let event = CouponEvent::Issued {
                coupon_id: c.coupon_id,
                owner_user_id: c.owner_user_id,
                value_minor: c.value_minor,
            };
            seeded += u32::from(seed_one(&self.log, stream, event.into()).await?);
        }
        Ok(Response::new(pb::SeedCouponsResponse { seeded }))
    }
}

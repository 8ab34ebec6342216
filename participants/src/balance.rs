//! The balance role: each user's money, in minor units.
//!
//! Events: `AccountOpened` (stream `seed/account/<id>`), `BalanceDeducted` (a step's action)
//! and `BalanceRefunded` (its compensation). Read model: `balance/<user>` -> i64.
//! Invariant kept by [`decide`] inside the append's transaction, asserted by [`apply`]: no
//! balance goes below zero.

use saga_proto::v1 as pb;
use saga_storage::{EventLog, ProjectError, ProjectionTx};
use tonic::{Request, Response, Status};

use crate::keys;
use crate::projector::{get, put};
use crate::record::ParticipantEvent;
use crate::refusal::{Refusal, Refused};
use crate::service::{
    barrier_status, check_id, check_ids, check_positive, check_seed_len, invalid, other_action,
    read_projection, scan_projection, seed_one, step_key,
};

/// The balance role's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BalanceEvent {
    Opened {
        user_id: String,
        balance_minor: i64,
    },
    Deducted {
        user_id: String,
        amount_minor: i64,
        order_id: String,
    },
    Refunded {
        user_id: String,
        amount_minor: i64,
        order_id: String,
    },
}

impl BalanceEvent {
    pub fn name(&self) -> &'static str {
        match self {
            BalanceEvent::Opened { .. } => "AccountOpened",
            BalanceEvent::Deducted { .. } => "BalanceDeducted",
            BalanceEvent::Refunded { .. } => "BalanceRefunded",
        }
    }

    pub fn undo(&self) -> Option<BalanceEvent> {
        match self {
            BalanceEvent::Deducted {
                user_id,
                amount_minor,
                order_id,
            } => Some(BalanceEvent::Refunded {
                user_id: user_id.clone(),
                amount_minor: *amount_minor,
                order_id: order_id.clone(),
            }),
            BalanceEvent::Opened { .. } | BalanceEvent::Refunded { .. } => None,
        }
    }

    fn user_id(&self) -> &str {
        match self {
            BalanceEvent::Opened { user_id, .. }
            | BalanceEvent::Deducted { user_id, .. }
            | BalanceEvent::Refunded { user_id, .. } => user_id,
        }
    }
}

/// The guard: whether `event` may apply to the user's balance (`None`: no account).
pub fn decide(event: &BalanceEvent, balance_minor: Option<i64>) -> Result<(), Refused> {
    match (event, balance_minor) {
        (BalanceEvent::Opened { .. }, _) => Ok(()),
        (BalanceEvent::Deducted { user_id, .. } | BalanceEvent::Refunded { user_id, .. }, None) => {
            Err(Refused::new(Refusal::UnknownEntity, format!("user {user_id}")))
        }
        (
            BalanceEvent::Deducted {
                user_id,
                amount_minor,
                ..
            },
            Some(balance),
        ) if balance < *amount_minor => Err(Refused::new(
            Refusal::InsufficientBalance,
            format!("user {user_id} has {balance}, {amount_minor} wanted"),
        )),
        (BalanceEvent::Deducted { .. } | BalanceEvent::Refunded { .. }, Some(_)) => Ok(()),
    }
}

/// Applies a decided event. Cannot fail; panics if the fold breaks its invariant (a bug).
pub fn apply(event: &BalanceEvent, balance_minor: &mut Option<i64>) {
    match event {
        BalanceEvent::Opened { balance_minor: b, .. } => *balance_minor = Some(*b),
        BalanceEvent::Deducted { amount_minor, .. } => {
            let balance = balance_minor
                .as_mut()
                .expect("a deducted account exists (decided)");
            *balance -= amount_minor;
            assert!(*balance >= 0, "balance of {} went negative", event.user_id());
        }
        BalanceEvent::Refunded { amount_minor, .. } => {
            *balance_minor
                .as_mut()
                .expect("a refunded account exists (decided)") += amount_minor;
        }
    }
}

pub(crate) fn project(event: &BalanceEvent, tx: &mut ProjectionTx<'_>) -> Result<(), ProjectError> {
    let key = keys::balance(event.user_id());
    let mut balance = get::<i64>(tx, &key)?;
    decide(event, balance).map_err(ProjectError::refused)?;
    apply(event, &mut balance);
    put(tx, &key, balance.as_ref())
}

/// `saga.v1.BalanceService`.
#[derive(Clone)]
pub struct BalanceService {
    pub(crate) log: EventLog,
    pub(crate) barrier: std::sync::Arc<dyn crate::barrier::Barrier>,
    /// Admits the seed call (`saga_proto::auth`).
    pub(crate) admin: saga_proto::auth::AdminToken,
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
        let action = BalanceEvent::Deducted {
            user_id: r.user_id,
            amount_minor: r.amount_minor,
            order_id: r.order_id,
        };
        let (done, replayed) = self
            .barrier
            .act(&key, action.into())
            .await
            .map_err(barrier_status)?;
        let ParticipantEvent::Balance(BalanceEvent::Deducted { user_id, .. }) = done else {
            return Err(other_action(&key));
        };
        let balance_minor = read_projection::<i64>(&self.log, &keys::balance(&user_id))
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
            for (user_id, balance_minor) in scan_projection::<i64>(&self.log, keys::BALANCE_PREFIX).await? {
                accounts.push(pb::Account {
                    user_id,
                    balance_minor,
                });
            }
        } else {
            for id in &ids {
                if let Some(balance_minor) = read_projection::<i64>(&self.log, &keys::balance(id)).await? {
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
        self.admin.check(request.metadata())?;
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
            let stream = keys::seed_stream("account", &a.user_id);
            let event = BalanceEvent::Opened {
                user_id: a.user_id,
                balance_minor: a.balance_minor,
            };
            seeded += u32::from(seed_one(&self.log, stream, event.into()).await?);
        }
        Ok(Response::new(pb::SeedBalancesResponse { seeded }))
    }
}

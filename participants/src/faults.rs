//! Fault injection for process tests and chaos runs, compiled only with the `faults` feature
//! (the test crates enable it; a production build has none of this).
//!
//! The `saga-participant` binary reads a [`FaultPlan`] from its environment and wraps the
//! participant's barrier in a [`FaultyBarrier`]; the services and the compensation consumer
//! call the barrier through the `Barrier` trait and never know. Variables:
//!
//! - [`ACT_FAULT_ENV`]: a comma-separated list of `delay:<step>:<ms>` (every action of `<step>`
//!   answers `<ms>` after it was applied, so the caller's deadline passes after the effect:
//!   "outcome unknown") and `refuse:<step>[:<times>]` (the first `<times>` actions of `<step>`,
//!   or all, are refused with INVALID_STATE without recording anything);
//! - [`FAULT_PREFIX_ENV`]: compensations of sagas whose id starts with this prefix fail (as a
//!   storage outage would), so the consumer's retry and parking paths run end to end;
//! - [`CRASH_PREFIX_ENV`]: right after applying a compensation of a saga whose id starts with
//!   this prefix (durable, with the consumer log's success and the acknowledgement in the
//!   outbox: one append), the call stops for good, before the consumer hands the message back
//!   as consumed, and says so on stderr; a test then kills the process with SIGKILL (the
//!   "killed between applying and consuming" case, at a known point: the broker redelivers).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::barrier::{AlsoRecord, Barrier, BarrierError, Compensated, StepKey, StepState};
use crate::record::ParticipantEvent;
use crate::refusal::{Refusal, Refused};

pub const ACT_FAULT_ENV: &str = crate::FAULT_PLAN_ENV[0];
pub const FAULT_PREFIX_ENV: &str = crate::FAULT_PLAN_ENV[1];
pub const CRASH_PREFIX_ENV: &str = crate::FAULT_PLAN_ENV[2];

/// One fault of [`ACT_FAULT_ENV`].
#[derive(Debug)]
pub enum ActFault {
    DelayAfterApply { step: String, delay_ms: u64 },
    Refuse { step: String, times_left: AtomicU64 },
}

impl ActFault {
    /// Parses the whole variable; `None` if any entry is malformed.
    pub fn parse_list(text: &str) -> Option<Vec<ActFault>> {
        text.split(',')
            .filter(|p| !p.is_empty())
            .map(ActFault::parse)
            .collect()
    }

    fn parse(text: &str) -> Option<ActFault> {
        let mut parts = text.split(':');
        match (parts.next()?, parts.next()?, parts.next(), parts.next()) {
            ("delay", step, Some(ms), None) => Some(ActFault::DelayAfterApply {
                step: step.to_owned(),
                delay_ms: ms.parse().ok()?,
            }),
            ("refuse", step, times, None) => Some(ActFault::Refuse {
                step: step.to_owned(),
                times_left: AtomicU64::new(match times {
                    Some(n) => n.parse().ok()?,
                    None => u64::MAX,
                }),
            }),
            _ => None,
        }
    }
}

/// The faults a process injects.
#[derive(Debug, Default)]
pub struct FaultPlan {
    pub act: Vec<ActFault>,
    pub compensation_fails_for: Option<String>,
    pub freeze_after_apply_for: Option<String>,
}

/// A variable of the plan that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{variable}: cannot parse {value:?}")]
pub struct BadFaultPlan {
    pub variable: &'static str,
    pub value: String,
}

impl FaultPlan {
    /// The plan the environment describes (empty when no variable is set).
    pub fn from_env() -> Result<FaultPlan, BadFaultPlan> {
        let prefix = |name| std::env::var(name).ok().filter(|p: &String| !p.is_empty());
        let act = match std::env::var(ACT_FAULT_ENV) {
            Ok(value) => ActFault::parse_list(&value).ok_or(BadFaultPlan {
                variable: ACT_FAULT_ENV,
                value,
            })?,
            Err(_) => Vec::new(),
        };
        Ok(FaultPlan {
            act,
            compensation_fails_for: prefix(FAULT_PREFIX_ENV),
            freeze_after_apply_for: prefix(CRASH_PREFIX_ENV),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.act.is_empty() && self.compensation_fails_for.is_none() && self.freeze_after_apply_for.is_none()
    }

    /// `inner` with this plan's faults around it.
    pub fn decorate(self, inner: Arc<dyn Barrier>) -> Arc<dyn Barrier> {
        Arc::new(FaultyBarrier { inner, plan: self })
    }

    fn has_refusals(&self, step: &str) -> bool {
        self.act
            .iter()
            .any(|f| matches!(f, ActFault::Refuse { step: s, .. } if s == step))
    }

    fn refuses(&self, step: &str) -> bool {
        self.act.iter().any(|f| match f {
            ActFault::Refuse { step: s, times_left } => {
                s == step
                    && times_left
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
            }
            ActFault::DelayAfterApply { .. } => false,
        })
    }

    fn delay_ms(&self, step: &str) -> Option<u64> {
        self.act.iter().find_map(|f| match f {
            ActFault::DelayAfterApply { step: s, delay_ms } if s == step => Some(*delay_ms),
            _ => None,
        })
    }
}

/// A barrier with a fault plan around it.
pub struct FaultyBarrier {
    inner: Arc<dyn Barrier>,
    plan: FaultPlan,
}

#[tonic::async_trait]
impl Barrier for FaultyBarrier {
    async fn act(
        &self,
        key: &StepKey,
        action: ParticipantEvent,
    ) -> Result<(ParticipantEvent, bool), BarrierError> {
        // A refusal promises the caller that nothing happened (the engine does not compensate
        // a refused step), so only a step whose stream is empty is refused: a repeat of an
        // action recorded earlier (before this process started with its plan, say) gets the
        // barrier's answer.
        if self.plan.has_refusals(&key.step)
            && self.inner.state(key).await? == StepState::Empty
            && self.plan.refuses(&key.step)
        {
            return Err(BarrierError::Refused(Refused::new(
                Refusal::InvalidState,
                format!("injected refusal ({ACT_FAULT_ENV})"),
            )));
        }
        let done = self.inner.act(key, action).await?;
        if let Some(delay_ms) = self.plan.delay_ms(&key.step)
            && !done.1
        {
            tokio::time::sleep(std::time::Duration::from_millis(delay_ms)).await;
        }
        Ok(done)
    }

    async fn state(&self, key: &StepKey) -> Result<StepState, BarrierError> {
        self.inner.state(key).await
    }

    async fn compensate(
        &self,
        key: &StepKey,
        also: Option<&AlsoRecord<'_>>,
    ) -> Result<Compensated, BarrierError> {
        let prefixed =
            |prefix: &Option<String>| prefix.as_deref().is_some_and(|p| key.saga_id.starts_with(p));
        if prefixed(&self.plan.compensation_fails_for) {
            return Err(BarrierError::Storage(saga_storage::StorageError::Failed(
                format!("injected fault ({FAULT_PREFIX_ENV})"),
            )));
        }
        let compensated = self.inner.compensate(key, also).await?;
        if prefixed(&self.plan.freeze_after_apply_for) {
            eprintln!(
                "injected fault ({CRASH_PREFIX_ENV}): frozen after applying {}:{}",
                key.saga_id, key.step
            );
            return std::future::pending().await;
        }
        Ok(compensated)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::barrier::StepBarrier;
    use crate::stock::{Item, StockEvent};
    use crate::{Participant, Role};

    fn key(step: &str) -> StepKey {
        StepKey {
            saga_id: "ord-1".into(),
            step: step.into(),
        }
    }

    fn reserve() -> ParticipantEvent {
        StockEvent::Reserved {
            order_id: "ord-1".into(),
            items: vec![Item {
                product_id: "p".into(),
                quantity: 1,
            }],
        }
        .into()
    }

    /// A stock participant with product `p` seeded, and its undecorated barrier.
    async fn seeded_stock(dir: &tempfile::TempDir) -> (Participant, Arc<dyn Barrier>) {
        let participant = Participant::open(Role::Stock, dir.path()).expect("opens");
        let seed = StockEvent::Seeded {
            product_id: "p".into(),
            available: 5,
        };
        crate::service::seed_one(
            participant.log(),
            crate::keys::seed_stream("product", "p"),
            seed.into(),
        )
        .await
        .expect("seeds");
        let inner: Arc<dyn Barrier> = Arc::new(StepBarrier {
            log: participant.log().clone(),
        });
        (participant, inner)
    }

    /// A participant restarted with a refusal plan must not refuse a repeat of an action its
    /// log already holds: the caller would take the refusal for "nothing happened" and never
    /// compensate an effect that is there.
    #[tokio::test]
    async fn an_injected_refusal_never_refuses_an_action_that_took_effect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (_participant, inner) = seeded_stock(&dir).await;
        inner
            .act(&key("reserve_stock"), reserve())
            .await
            .expect("applies");
        // "Restarted" with a plan that refuses every reservation.
        let plan = FaultPlan {
            act: ActFault::parse_list("refuse:reserve_stock").expect("parses"),
            ..FaultPlan::default()
        };
        let barrier = plan.decorate(inner);
        let (_, replayed) = barrier
            .act(&key("reserve_stock"), reserve())
            .await
            .expect("the recorded action is answered, not refused");
        assert!(replayed);
    }

    #[tokio::test]
    async fn the_decorator_refuses_before_the_barrier_and_delays_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (participant, inner) = seeded_stock(&dir).await;
        let plan = FaultPlan {
            act: ActFault::parse_list("refuse:reserve_stock:1,delay:other_step:300").expect("parses"),
            ..FaultPlan::default()
        };
        let barrier = plan.decorate(inner);
        // Refused once, with nothing recorded: the step stream stays empty.
        let refused = barrier.act(&key("reserve_stock"), reserve()).await;
        assert!(matches!(refused, Err(BarrierError::Refused(ref r)) if r.reason == Refusal::InvalidState));
        assert_eq!(
            crate::barrier::state(participant.log(), &key("reserve_stock"))
                .await
                .expect("reads"),
            crate::barrier::StepState::Empty
        );
        // The second call reaches the barrier and is applied, without delay.
        let began = Instant::now();
        let (_, replayed) = barrier
            .act(&key("reserve_stock"), reserve())
            .await
            .expect("applies");
        assert!(!replayed);
        assert!(
            began.elapsed() < Duration::from_millis(300),
            "{:?}",
            began.elapsed()
        );
        // A delayed step answers after its delay, applied (the caller's deadline may pass).
        let began = Instant::now();
        let (_, replayed) = barrier.act(&key("other_step"), reserve()).await.expect("applies");
        assert!(!replayed);
        assert!(
            began.elapsed() >= Duration::from_millis(300),
            "{:?}",
            began.elapsed()
        );
    }
}

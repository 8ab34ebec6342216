//! The generic saga engine: starts sagas, drives each through its definition, requests
//! compensations through the outbox, applies participants' acknowledgements, and recovers
//! every unfinished saga on start.
//!
//! One driver task per running saga is the only writer of its stream while it runs forward;
//! acknowledgements (compensating sagas) and operators (stuck sagas) write with the exact
//! version they folded, so a race is a version conflict that the loser re-decides, never a
//! lost update. Abort is cooperative: the API leaves a request that the driver records between
//! steps.
//!
//! Latency and records: the compensable steps of a saga are called one after the other with
//! no append between them; their `StepStarted` and outcomes wait in the driver's pending
//! events and reach the log in one append: before the first step without compensation is
//! called (invariant 3: past the pivot a saga may only go forward, so the log must know first),
//! or with the compensation request, the saga's final event, a retry's backoff or a drain. A
//! completed order saga thus makes three appends of its own (start, pivot, end) instead of one
//! per step. That is safe because every call is idempotent by key, and because compensation
//! covers every compensable step after the last one the log shows started (invariant 1 in
//! `state`): a step called with no record is compensated after a crash all the same, and a
//! resumed saga calls the steps again, which the participants' barriers answer with their first
//! outcomes. Each append is still durable before anything depends on it (a step without
//! compensation, the outbox, the final event a client waits for).
//!
//! Acknowledgements (invariant 4): every compensation has a deadline. A compensating saga
//! whose acks did not all come is re-published when it passes (the participants' barrier makes
//! a duplicate harmless), with a growing deadline, and marked Stuck with the reason after
//! [`EngineConfig::compensation_republishes_max`] re-publishes. The deadlines live in one
//! timer task (not in sleeping drivers), rebuilt by recovery from the saga states.
//!
//! Routing: each compensation request names the acknowledgement topic and the tag of the
//! orchestrator that owns the saga ([`EngineConfig::node_id`]); participants acknowledge there,
//! so an ack reaches its owner even when several orchestrators share a broker. An ack for a
//! saga this orchestrator does not know is logged as an error, never silently dropped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use saga_messaging::transport::{BoxFuture, Delivery, Handler, Outcome, Transport};
use saga_proto::v1 as pb;
use saga_storage::{
    AppendRequest, Contended, EventLog, ExpectedVersion, NewEvent, OutboxMessage, StorageError,
    StreamVersion, Tried, retry_on_conflict,
};
use tokio::sync::{Notify, watch};

use crate::definition::{SagaDefinition, StepDef};
use crate::events::{CompensationOutcome, FailureKind, SagaEvent};
use crate::projector;
use crate::state::{FoldError, Next, Phase, SagaState, Status};

/// The orchestrator's default node id: the tag its acknowledgements carry.
pub const NODE_ID_DEFAULT: &str = "main";

/// What a node logs (at error level) when it receives the acknowledgement of a saga it does not
/// own: a misrouted ack. Tests and the scale bench look for it in a node's log.
pub const MISROUTED_ACK: &str = "acknowledgement for a saga this orchestrator does not have";

/// The consumer group of an orchestrator node on the acknowledgement topic (each node its own
/// group, filtering its own tag: every node sees exactly its acknowledgements).
pub fn ack_group(node_id: &str) -> String {
    format!("saga-orchestrator-{node_id}")
}
/// How long AbortSaga waits for the driver to record the abort (a step call in flight finishes
/// first, bounded by its deadline).
const ABORT_WAIT: Duration = Duration::from_secs(30);

/// How a step call failed, as the invoker classifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepError {
    Business(String),
    Transient(String),
    Unknown(String),
}

/// A step call that missed its deadline: outcome unknown, one text whoever noticed first (the
/// engine's timer or the gRPC deadline the invoker passed on).
pub fn deadline_missed(deadline_ms: u64) -> StepError {
    StepError::Unknown(format!("no answer within the {deadline_ms} ms deadline"))
}

/// Performs steps' forward actions: the definition-specific side of the engine.
pub trait StepInvoker: Send + Sync + 'static {
    /// Calls `step` for saga `saga_id` with the saga's payload. The engine applies the step's
    /// deadline around the returned future; the invoker should pass it on to the callee.
    fn invoke(
        &self,
        saga_id: &str,
        step: &StepDef,
        payload: &[u8],
    ) -> BoxFuture<'static, Result<(), StepError>>;

    /// Whether this invoker performs every step of `def`; called once per definition when the
    /// engine is built, so that a definition the invoker cannot run is refused at start.
    fn check(&self, _def: &SagaDefinition) -> Result<(), crate::definition::InvalidDefinition> {
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Where compensation requests are published (tag = participant role).
    pub compensation_topic: String,
    /// Where participants must acknowledge compensations (named in every request).
    pub ack_topic: String,
    /// This orchestrator's id: the tag of its acknowledgements (named in every request).
    pub node_id: String,
    /// Acknowledgements over gRPC: this orchestrator's address as participants reach it and its
    /// key, named (the address, a token per step) in every request, so that participants
    /// acknowledge with `AcknowledgeCompensations` instead of through `ack_topic`; `None`:
    /// through the topic only.
    pub ack_endpoint: Option<AckEndpoint>,
    /// Most sagas driven at once; further ones queue (one queue entry per saga, no task).
    pub drivers_max: usize,
    /// How long the first acknowledgement of a compensation may take before it is re-published;
    /// doubled after each re-publish, up to 8 times this.
    pub compensation_ack_deadline_ms: u64,
    /// Re-publishes of unacknowledged compensations before the saga is marked Stuck.
    pub compensation_republishes_max: u32,
}

/// Where and how participants acknowledge over gRPC (see [`EngineConfig::ack_endpoint`]).
#[derive(Debug, Clone)]
pub struct AckEndpoint {
    /// `http://host:port`.
    pub url: String,
    pub key: crate::ack_key::AckKey,
}

impl Default for EngineConfig {
    fn default() -> Self {
        // Re-published after 30 s, then 60, 120, 240, 240, 240 s more, Stuck 240 s after the
        // sixth: ~20 min of silence before an operator is needed. Well above the
        // broker's own redelivery schedule (10 s, 40 s, 100 s) and a broker restart (~30-60 s
        // of failing sends, ROCKETMQ.md), so only a participant that is really gone gets here.
        EngineConfig {
            compensation_topic: saga_messaging::topics::COMPENSATION_TOPIC.into(),
            ack_topic: saga_messaging::topics::COMPENSATION_ACK_TOPIC.into(),
            node_id: NODE_ID_DEFAULT.into(),
            ack_endpoint: None,
            drivers_max: 4096,
            compensation_ack_deadline_ms: 30_000,
            compensation_republishes_max: 6,
        }
    }
}

impl EngineConfig {
    /// When a compensation sent at `sent_at_unix_us` and re-published `republishes` times is
    /// overdue.
    pub fn ack_deadline_unix_us(&self, sent_at_unix_us: i64, republishes: u32) -> i64 {
        let deadline_ms = self
            .compensation_ack_deadline_ms
            .saturating_mul(1 << republishes.min(3));
        sent_at_unix_us.saturating_add(deadline_ms.saturating_mul(1000) as i64)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("saga {0} not found")]
    NotFound(String),
    /// The saga's state does not allow the operation.
    #[error("{0}")]
    Precondition(String),
    #[error("unknown saga definition {0:?}")]
    UnknownDefinition(String),
    /// A stored saga stream does not fold (a bug or damage): never skipped.
    #[error("saga {saga} cannot be replayed: {error}")]
    Corrupt {
        saga: String,
        error: crate::state::FoldError,
    },
    #[error("saga {0}: too many concurrent writers")]
    Contended(String),
    /// The request id names a saga started with another input.
    #[error("request_id {request_id:?} was used for saga {saga_id} with another order")]
    AlreadyExists { request_id: String, saga_id: String },
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The engine is draining for a shutdown ([`Engine::drain`]): it starts, retries and
    /// aborts nothing more.
    #[error("the orchestrator is shutting down; try again (another instance, or this one after its restart)")]
    ShuttingDown,
}

/// The engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    log: EventLog,
    definitions: HashMap<String, Arc<SagaDefinition>>,
    invoker: Arc<dyn StepInvoker>,
    config: EngineConfig,
    drivers: Mutex<Drivers>,
    aborts: Mutex<HashMap<String, String>>,
    watchers: Mutex<HashMap<String, watch::Sender<u64>>>,
    relay_wake: Arc<Notify>,
    timers: Mutex<Timers>,
    timers_wake: Arc<Notify>,
    last_id_us: Mutex<u64>,
    node: u32,
    /// Set by [`Engine::drain`]; never cleared.
    draining: std::sync::atomic::AtomicBool,
    /// Notified when the last driver worker ends.
    drivers_idle: Notify,
}

/// Which sagas are driven: at most `drivers_max` worker tasks take saga ids from one queue
/// (admission bound: a burst or a recovery of many sagas queues ids, not tasks).
#[derive(Default)]
struct Drivers {
    /// Sagas queued or being driven; `true` when something asked for another pass while one
    /// runs.
    scheduled: HashMap<String, bool>,
    queue: std::collections::VecDeque<String>,
    workers: usize,
}

/// Deadlines of compensating sagas (one entry per saga, the latest wins).
#[derive(Default)]
struct Timers {
    by_saga: HashMap<String, tokio::time::Instant>,
    by_time: std::collections::BTreeSet<(tokio::time::Instant, String)>,
    running: bool,
}

pub use saga_storage::clock::now_unix_us as now_us;

/// Opens the orchestrator's log with its projector.
pub fn open_log(config: saga_storage::LogConfig) -> Result<EventLog, StorageError> {
    EventLog::open_with(config, Some(Arc::new(projector::SagaProjector)))
}

impl Engine {
    /// An engine over `log` (opened with [`open_log`]). Call [`Engine::recover`] once, and run
    /// [`Engine::run_relay`] and an acknowledgement subscription ([`AckHandler`]).
    ///
    /// # Panics
    /// If a definition is invalid (`SagaDefinition::validate`) or `invoker` refuses it
    /// (`StepInvoker::check`): definitions are code.
    pub fn new(
        log: EventLog,
        definitions: Vec<SagaDefinition>,
        invoker: Arc<dyn StepInvoker>,
        config: EngineConfig,
    ) -> Engine {
        for def in &definitions {
            if let Err(error) = def.validate().and_then(|()| invoker.check(def)) {
                // Definitions are code, not input: a definition its invoker cannot run is a bug.
                panic!("saga definition {:?}: {error}", def.name);
            }
        }
        Engine {
            inner: Arc::new(Inner {
                log,
                definitions: definitions
                    .into_iter()
                    .map(|d| (d.name.clone(), Arc::new(d)))
                    .collect(),
                invoker,
                config,
                drivers: Mutex::default(),
                aborts: Mutex::default(),
                watchers: Mutex::default(),
                relay_wake: Arc::new(Notify::new()),
                timers: Mutex::default(),
                timers_wake: Arc::new(Notify::new()),
                last_id_us: Mutex::new(0),
                node: fastrand::u32(..),
                draining: std::sync::atomic::AtomicBool::new(false),
                drivers_idle: Notify::new(),
            }),
        }
    }

    /// Acknowledgements over gRPC, when on (`EngineConfig::ack_endpoint`).
    pub fn ack_endpoint(&self) -> Option<&AckEndpoint> {
        self.inner.config.ack_endpoint.as_ref()
    }

    pub fn log(&self) -> &EventLog {
        &self.inner.log
    }

    fn is_draining(&self) -> bool {
        self.inner.draining.load(std::sync::atomic::Ordering::Acquire)
    }

    fn refuse_if_draining(&self) -> Result<(), EngineError> {
        if self.is_draining() {
            Err(EngineError::ShuttingDown)
        } else {
            Ok(())
        }
    }

    /// Prepares a shutdown: from now on nothing new is started (start, retry and abort answer
    /// [`EngineError::ShuttingDown`]) and drivers call no further step: a pass ends, with what
    /// it decided durable, where it would call one, leaving the saga running for the next
    /// start's recovery. Step calls already made finish and their outcomes are recorded.
    /// Waits until no driver pass runs, or `grace` passed; returns whether it got there.
    ///
    /// Crash windows: none of its own. Every pass appends before it returns or ends (a pass
    /// that still runs at the deadline is cut off by the process exit like a crash, which
    /// recovery handles); acknowledgements keep being applied while it waits.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.inner
            .draining
            .store(true, std::sync::atomic::Ordering::Release);
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let idle = self.inner.drivers_idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.inner.drivers.lock().expect("drivers lock").workers == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, idle).await.is_err() {
                return false;
            }
        }
    }

    fn definition(&self, name: &str) -> Result<Arc<SagaDefinition>, EngineError> {
        self.inner
            .definitions
            .get(name)
            .cloned()
            .ok_or_else(|| EngineError::UnknownDefinition(name.to_owned()))
    }

    /// A new saga id: `<prefix>-<start time, µs, hex>-<process nonce>`. Sortable by start time
    /// within a process; the nonce keeps ids of orchestrators started at the same moment apart
    /// (and a collision would still be caught by the `NoStream` append).
    fn new_id(&self, prefix: &str) -> String {
        let mut last = self.inner.last_id_us.lock().expect("id lock");
        let us = (now_us() as u64).max(*last + 1);
        *last = us;
        format!("{prefix}-{us:014x}-{:08x}", self.inner.node)
    }

    /// Loads a saga by folding its stream.
    pub async fn load(&self, saga_id: &str) -> Result<Option<SagaState>, EngineError> {
        let mut events = Vec::new();
        loop {
            let records = self
                .inner
                .log
                .read_stream(
                    saga_id,
                    StreamVersion::new(events.len() as u64 + 1),
                    saga_storage::log::READ_LEN_MAX,
                )
                .await?;
            let n = records.len();
            for record in records {
                events.push((record.decode::<SagaEvent>()?, record.timestamp_us()));
            }
            if n < saga_storage::log::READ_LEN_MAX {
                break;
            }
        }
        SagaState::fold(saga_id, events).map_err(|error| EngineError::Corrupt {
            saga: saga_id.to_owned(),
            error,
        })
    }

    /// The saga started for `request_id`, if any.
    pub async fn saga_of_request(&self, request_id: &str) -> Result<Option<String>, EngineError> {
        Ok(self
            .inner
            .log
            .projection_get(crate::keys::request(request_id))
            .await?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// Appends `events` (and `outbox`) at exactly `version`, where the saga's status is
    /// `before` (`None`: a new saga; for the metrics); returns the new version. Durable on
    /// return; watchers are told.
    async fn append(
        &self,
        definition: &str,
        saga_id: &str,
        version: StreamVersion,
        before: Option<Status>,
        events: &[SagaEvent],
        outbox: Vec<OutboxMessage>,
    ) -> Result<StreamVersion, StorageError> {
        let mut request = AppendRequest::new(saga_id, ExpectedVersion::at(version));
        for event in events {
            request = request.event(NewEvent::encode(event.name(), event)?);
        }
        let has_outbox = !outbox.is_empty();
        for message in outbox {
            request = request.outbox(message);
        }
        let appended = self.inner.log.append(request).await.inspect_err(|error| {
            if matches!(error, StorageError::VersionConflict { .. }) {
                crate::metric::append_conflicted();
            }
        })?;
        crate::metric::sagas_appended(definition, before, events);
        if has_outbox {
            self.inner.relay_wake.notify_one();
        }
        if let Some(tx) = self.inner.watchers.lock().expect("watchers lock").get(saga_id) {
            tx.send_replace(appended.stream_version.get());
        }
        Ok(appended.stream_version)
    }

    /// Starts a saga of `definition` for `request_id`. Idempotent by request id: a repeat
    /// returns the existing saga and `false`. Returns once `SagaStarted` is durable; the saga
    /// then runs in the background.
    ///
    /// Runs in a task of its own ([`detached`]): a caller that goes away (a cancelled gRPC
    /// call drops its future) must not split the append, which completes in the writer
    /// anyway, from the drive that follows it.
    pub async fn start(
        &self,
        definition: &str,
        request_id: &str,
        payload: Vec<u8>,
        skipped: Vec<String>,
    ) -> Result<(SagaState, bool), EngineError> {
        let (engine, definition, request_id) = (self.clone(), definition.to_owned(), request_id.to_owned());
        detached(async move {
            engine
                .start_attached(&definition, &request_id, payload, skipped)
                .await
        })
        .await
    }

    async fn start_attached(
        &self,
        definition: &str,
        request_id: &str,
        payload: Vec<u8>,
        skipped: Vec<String>,
    ) -> Result<(SagaState, bool), EngineError> {
        self.refuse_if_draining()?;
        let def = self.definition(definition)?;
        let (wanted_payload, mut wanted_skipped) = (payload.clone(), skipped.clone());
        wanted_skipped.sort();
        let def_name = def.name.clone();
        let same = move |existing: &SagaState| {
            let mut skipped = existing.skipped();
            skipped.sort();
            existing.definition == def_name && existing.payload == wanted_payload && skipped == wanted_skipped
        };
        if let Some(existing) = self.existing(request_id).await? {
            return same_or_refused(existing, request_id, &same);
        }
        let started = SagaEvent::SagaStarted {
            definition: def.name.clone(),
            request_id: request_id.to_owned(),
            payload,
            steps: def.steps.iter().map(|s| s.name.clone()).collect(),
            skipped,
        };
        let (started, same, def) = (&started, &same, &def);
        retry_on_conflict(
            || format!("start of request {request_id}"),
            || async move {
                // A fresh id per try: a conflict here is an id collision, or a concurrent start.
                let saga_id = self.new_id(&def.id_prefix);
                match self
                    .append(
                        &def.name,
                        &saga_id,
                        StreamVersion::NONE,
                        None,
                        std::slice::from_ref(started),
                        Vec::new(),
                    )
                    .await
                {
                    Ok(_) => {
                        let state = SagaState::fold(&saga_id, [(started.clone(), now_us())])
                            .map_err(|error| EngineError::Corrupt {
                                saga: saga_id.clone(),
                                error,
                            })?
                            .expect("one event folds to a state");
                        self.drive(&saga_id);
                        Ok(Tried::Done((state, true)))
                    }
                    // A concurrent start with the same request id won.
                    Err(e) if e.refusal::<projector::DuplicateRequest>().is_some() => {
                        match self.existing(request_id).await? {
                            Some(existing) => same_or_refused(existing, request_id, same).map(Tried::Done),
                            None => Ok(Tried::Conflicted),
                        }
                    }
                    Err(StorageError::VersionConflict { .. }) => Ok(Tried::Conflicted),
                    Err(e) => Err(e.into()),
                }
            },
        )
        .await
    }

    async fn existing(&self, request_id: &str) -> Result<Option<SagaState>, EngineError> {
        match self.saga_of_request(request_id).await? {
            Some(saga_id) => self.load(&saga_id).await,
            None => Ok(None),
        }
    }

    /// Makes sure a driver runs for the saga (another pass if one is running now). At most
    /// `drivers_max` sagas are driven at once; the others wait in a queue of ids.
    pub fn drive(&self, saga_id: &str) {
        let spawn = {
            let mut drivers = self.inner.drivers.lock().expect("drivers lock");
            if let Some(again) = drivers.scheduled.get_mut(saga_id) {
                *again = true;
                return;
            }
            drivers.scheduled.insert(saga_id.to_owned(), false);
            drivers.queue.push_back(saga_id.to_owned());
            let spawn = drivers.workers < self.inner.config.drivers_max.max(1);
            if spawn {
                drivers.workers += 1;
            }
            spawn
        };
        if spawn {
            let engine = self.clone();
            tokio::spawn(async move { engine.drive_queue().await });
        }
    }

    /// A driver worker: drives queued sagas until the queue is empty.
    async fn drive_queue(self) {
        let mut slot = WorkerSlot {
            engine: self.clone(),
            saga: None,
            armed: true,
        };
        loop {
            let saga_id = {
                let mut drivers = self.inner.drivers.lock().expect("drivers lock");
                match drivers.queue.pop_front() {
                    Some(saga_id) => saga_id,
                    None => {
                        slot.armed = false;
                        drivers.workers -= 1;
                        if drivers.workers == 0 {
                            self.inner.drivers_idle.notify_waiters();
                        }
                        return;
                    }
                }
            };
            slot.saga = Some(saga_id.clone());
            loop {
                let span = saga_proto::trace::saga_span("driver", &saga_id, None);
                if let Err(error) = tracing::Instrument::instrument(self.run_driver(&saga_id), span).await {
                    // Not left for the next start: a compensating saga's deadline and a running
                    // saga's next step depend on a driver pass.
                    tracing::error!(saga = %saga_id, %error, retry_in_ms = DRIVER_RETRY_AFTER.as_millis() as u64, "saga driver stopped; it is driven again later");
                    self.schedule(&saga_id, tokio::time::Instant::now() + DRIVER_RETRY_AFTER);
                }
                let mut drivers = self.inner.drivers.lock().expect("drivers lock");
                match drivers.scheduled.get_mut(&saga_id) {
                    Some(again) if *again => *again = false,
                    _ => {
                        drivers.scheduled.remove(&saga_id);
                        break;
                    }
                }
            }
        }
    }

    /// Drives `saga_id` again at `at` (its acknowledgement deadline). The timer task holds
    /// only a weak reference: it ends with the engine.
    fn schedule(&self, saga_id: &str, at: tokio::time::Instant) {
        let spawn = {
            let mut timers = self.inner.timers.lock().expect("timers lock");
            if let Some(old) = timers.by_saga.insert(saga_id.to_owned(), at) {
                timers.by_time.remove(&(old, saga_id.to_owned()));
            }
            timers.by_time.insert((at, saga_id.to_owned()));
            !std::mem::replace(&mut timers.running, true)
        };
        self.inner.timers_wake.notify_one();
        if spawn {
            let weak = Arc::downgrade(&self.inner);
            tokio::spawn(run_timers(weak, Arc::clone(&self.inner.timers_wake)));
        }
    }

    fn compensation_messages(
        &self,
        state: &SagaState,
        def: &SagaDefinition,
        steps: &[String],
    ) -> Vec<OutboxMessage> {
        let requested_at_unix_ms = now_us() / 1000;
        let grpc_acks = self.inner.config.ack_endpoint.as_ref();
        steps
            .iter()
            .filter_map(|name| def.steps.iter().find(|d| d.name == *name))
            .map(|step| OutboxMessage {
                topic: self.inner.config.compensation_topic.clone(),
                tag: step.participant.clone(),
                key: saga_messaging::topics::message_key(&state.saga_id, &step.name),
                body: pb::CompensationRequest {
                    key: Some(pb::StepKey {
                        saga_id: state.saga_id.clone(),
                        step: step.name.clone(),
                    }),
                    role: step.participant.clone(),
                    requested_at_unix_ms,
                    ack_topic: self.inner.config.ack_topic.clone(),
                    ack_tag: self.inner.config.node_id.clone(),
                    // Every caller records the sending's event after building its messages.
                    round: state.compensation_round + 1,
                    traceparent: saga_proto::trace::outgoing(&state.saga_id).traceparent(),
                    ack_endpoint: grpc_acks.map(|a| a.url.clone()).unwrap_or_default(),
                    ack_token: grpc_acks
                        .map(|a| a.key.token(&state.saga_id, &step.name))
                        .unwrap_or_default(),
                }
                .encode_to_vec(),
            })
            .collect()
    }

    async fn call(&self, saga_id: &str, step: &StepDef, payload: &[u8]) -> Result<(), StepError> {
        let call = self.inner.invoker.invoke(saga_id, step, payload);
        let began = std::time::Instant::now();
        let result = match tokio::time::timeout(Duration::from_millis(step.deadline_ms), call).await {
            Ok(result) => result,
            Err(_) => Err(deadline_missed(step.deadline_ms)),
        };
        crate::metric::step_called(&step.name, began.elapsed(), &result);
        result
    }

    /// Drives one saga until it waits (for acknowledgements or an operator) or is final. Each
    /// pass loads the saga and decides from its state ([`Driver`]); a version conflict (another
    /// writer appended: an operator's retry, an acknowledgement) ends the pass, and the next
    /// one decides again from the reloaded stream.
    async fn run_driver(&self, saga_id: &str) -> Result<(), EngineError> {
        retry_on_conflict(
            || format!("driver of saga {saga_id}"),
            || async move {
                let mut driver = Driver::load(self, saga_id).await?;
                match driver.run().await {
                    Ok(()) => Ok(Tried::Done(())),
                    Err(Pass::Conflicted) => Ok(Tried::Conflicted),
                    Err(Pass::Failed(error)) => Err(error),
                }
            },
        )
        .await
    }

    /// Applies a participant's acknowledgement. Acks of unknown sagas (another orchestrator's)
    /// and duplicates change nothing. `Ok(false)`: this orchestrator does not have the saga (the
    /// caller says so: a misrouted ack).
    pub async fn on_ack(&self, ack: &pb::CompensationAck) -> Result<bool, EngineError> {
        let Some(key) = &ack.key else {
            tracing::warn!(?ack, "ack without a step key ignored");
            return Ok(true);
        };
        let outcome =
            pb::CompensationOutcome::try_from(ack.outcome).unwrap_or(pb::CompensationOutcome::Unspecified);
        retry_on_conflict(
            || format!("acknowledgement of {}:{}", key.saga_id, key.step),
            || async move {
                let Some(mut state) = self.load(&key.saga_id).await? else {
                    // Acks are routed to the owner (its node id, its endpoint), so this is a
                    // misrouted ack (a wrong node id, an endpoint that now serves another node,
                    // or a log that lost the saga): the caller makes it loud, never silent.
                    return Ok(Tried::Done(false));
                };
                let Some(step) = state.steps.iter().find(|s| s.name == key.step) else {
                    tracing::warn!(saga = %key.saga_id, step = %key.step, "ack for an unknown step ignored");
                    return Ok(Tried::Done(true));
                };
                let event = match (step.phase, outcome) {
                    (Phase::Compensating | Phase::CompensationParked, pb::CompensationOutcome::Applied) => {
                        SagaEvent::CompensationApplied {
                            step: key.step.clone(),
                            outcome: CompensationOutcome::Applied,
                        }
                    }
                    (Phase::Compensating | Phase::CompensationParked, pb::CompensationOutcome::Null) => {
                        SagaEvent::CompensationApplied {
                            step: key.step.clone(),
                            outcome: CompensationOutcome::Null,
                        }
                    }
                    (
                        Phase::Compensating | Phase::CompensationParked,
                        pb::CompensationOutcome::AlreadyApplied,
                    ) => SagaEvent::CompensationApplied {
                        step: key.step.clone(),
                        outcome: CompensationOutcome::AlreadyApplied,
                    },
                    // A PARKED of an earlier sending (relayed late) says nothing about this one.
                    (Phase::Compensating, pb::CompensationOutcome::Parked)
                        if ack.round != 0 && ack.round < state.compensation_round =>
                    {
                        tracing::info!(saga = %key.saga_id, step = %key.step, round = ack.round, current = state.compensation_round, "PARKED acknowledgement of an earlier round ignored");
                        return Ok(Tried::Done(true));
                    }
                    (Phase::Compensating, pb::CompensationOutcome::Parked) => SagaEvent::CompensationParked {
                        step: key.step.clone(),
                        error: ack.detail.clone(),
                    },
                    _ => return Ok(Tried::Done(true)),
                };
                let (version, before) = (state.version, state.status);
                let corrupt = |error| EngineError::Corrupt {
                    saga: key.saga_id.clone(),
                    error,
                };
                state.apply(&event, now_us()).map_err(corrupt)?;
                let mut events = vec![event];
                let open = |p: Phase| matches!(p, Phase::Compensating | Phase::CompensationParked);
                let parked = state.steps.iter().any(|s| s.phase == Phase::CompensationParked);
                if !state.steps.iter().any(|s| open(s.phase)) {
                    events.push(SagaEvent::SagaCompensated);
                } else if state.status == Status::Compensating && parked {
                    events.push(SagaEvent::SagaStuck {
                        reason: format!("compensation of {} parked: {}", key.step, ack.detail),
                    });
                } else if state.status == Status::Stuck && state.compensation_requested && !parked {
                    // The compensation made progress (a parked step was acknowledged, or a late
                    // ack came): nothing needs an operator any more.
                    events.push(SagaEvent::CompensationResumed {
                        reason: format!(
                            "compensation of {} acknowledged ({})",
                            key.step,
                            outcome.as_str_name()
                        ),
                    });
                }
                let resumed = matches!(events.last(), Some(SagaEvent::CompensationResumed { .. }));
                match self
                    .append(&state.definition, &key.saga_id, version, Some(before), &events, Vec::new())
                    .await
                {
                    Ok(_) => {
                        if resumed {
                            // Its acknowledgement deadline runs again.
                            self.drive(&key.saga_id);
                        }
                        Ok(Tried::Done(true))
                    }
                    Err(StorageError::VersionConflict { .. }) => Ok(Tried::Conflicted),
                    Err(e) => Err(e.into()),
                }
            },
        )
        .await
    }

    /// RetrySaga: a stuck saga's parked compensations are sent again, or its failed forward
    /// step is tried again from attempt 1. In a task of its own, as [`Engine::start`]: the
    /// durable `SagaRetried` and the drive after it are never split by a caller going away.
    pub async fn retry(&self, saga_id: &str, reason: &str) -> Result<SagaState, EngineError> {
        let (engine, saga_id, reason) = (self.clone(), saga_id.to_owned(), reason.to_owned());
        detached(async move { engine.retry_attached(&saga_id, &reason).await }).await
    }

    async fn retry_attached(&self, saga_id: &str, reason: &str) -> Result<SagaState, EngineError> {
        self.refuse_if_draining()?;
        retry_on_conflict(
            || format!("retry of saga {saga_id}"),
            || async move {
                let state = self
                    .load(saga_id)
                    .await?
                    .ok_or_else(|| EngineError::NotFound(saga_id.to_owned()))?;
                if state.status != Status::Stuck {
                    return Err(EngineError::Precondition(format!(
                        "saga {saga_id} is {}; only a stuck saga can be retried",
                        state.status.name()
                    )));
                }
                let def = self.definition(&state.definition)?;
                // Invariant 2: a saga that requested compensation is retried by sending every
                // compensation still open again (parked or unacknowledged), never forward.
                let resend: Vec<String> = state
                    .steps
                    .iter()
                    .rev()
                    .filter(|s| {
                        state.compensation_requested
                            && matches!(s.phase, Phase::CompensationParked | Phase::Compensating)
                    })
                    .map(|s| s.name.clone())
                    .collect();
                let outbox = self.compensation_messages(&state, &def, &resend);
                let event = if state.compensation_requested && resend.is_empty() {
                    // Nothing open (not reached: such a saga is Compensated); resume to finish.
                    SagaEvent::CompensationResumed {
                        reason: reason.to_owned(),
                    }
                } else {
                    SagaEvent::SagaRetried {
                        reason: reason.to_owned(),
                        compensations: resend,
                    }
                };
                match self
                    .append(
                        &state.definition,
                        saga_id,
                        state.version,
                        Some(state.status),
                        &[event],
                        outbox,
                    )
                    .await
                {
                    Ok(_) => {
                        self.drive(saga_id);
                        let state = self
                            .load(saga_id)
                            .await?
                            .ok_or_else(|| EngineError::NotFound(saga_id.to_owned()))?;
                        Ok(Tried::Done(state))
                    }
                    Err(StorageError::VersionConflict { .. }) => Ok(Tried::Conflicted),
                    Err(e) => Err(e.into()),
                }
            },
        )
        .await
    }

    /// AbortSaga: asks the saga's driver to stop going forward and compensate. Returns the
    /// state once the abort is recorded (or the saga ended otherwise first).
    pub async fn abort(&self, saga_id: &str, reason: &str) -> Result<SagaState, EngineError> {
        self.refuse_if_draining()?;
        let state = self
            .load(saga_id)
            .await?
            .ok_or_else(|| EngineError::NotFound(saga_id.to_owned()))?;
        let def = self.definition(&state.definition)?;
        if state.status != Status::Running {
            return Err(EngineError::Precondition(format!(
                "saga {saga_id} is {}; only a running saga can be aborted",
                state.status.name()
            )));
        }
        if !state.abortable(&def) {
            return Err(EngineError::Precondition(format!(
                "saga {saga_id} is past its last compensable step; it can only go forward"
            )));
        }
        let mut watch = self.watch(saga_id);
        self.inner
            .aborts
            .lock()
            .expect("aborts lock")
            .insert(saga_id.to_owned(), reason.to_owned());
        self.drive(saga_id);
        let deadline = tokio::time::Instant::now() + ABORT_WAIT;
        loop {
            let state = self
                .load(saga_id)
                .await?
                .ok_or_else(|| EngineError::NotFound(saga_id.to_owned()))?;
            if state.abort_requested || state.status != Status::Running {
                return Ok(state);
            }
            if tokio::time::timeout_at(deadline, watch.changed()).await.is_err() {
                return Ok(state);
            }
        }
    }

    /// Notifications of the saga's stream version (for WatchSaga). Drop the [`SagaWatch`] when
    /// done.
    pub fn watch(&self, saga_id: &str) -> SagaWatch {
        let mut watchers = self.inner.watchers.lock().expect("watchers lock");
        let rx = watchers
            .entry(saga_id.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        SagaWatch {
            engine: self.clone(),
            saga_id: saga_id.to_owned(),
            rx,
        }
    }

    /// Recovery: drives every saga that is not final (running ones go on; compensating ones
    /// re-check their acknowledgements). Unpublished outbox entries are the relay's. Returns
    /// how many sagas the scan found (a saga whose status changed between the two scans can
    /// be found twice; `drive` runs it once).
    pub async fn recover(&self) -> Result<usize, EngineError> {
        self.each_in_flight(|saga_id| self.drive(saga_id)).await
    }

    /// Starts the in-flight gauge from the log: call before anything can append (before the
    /// acknowledgement subscription and recovery), so that every later change is a delta.
    pub async fn count_in_flight(&self) -> Result<usize, EngineError> {
        let count = self.each_in_flight(|_| {}).await?;
        crate::metric::set_in_flight(count);
        Ok(count)
    }

    /// Calls `f` with every saga the status index holds as running, then every compensating
    /// one; returns how many.
    async fn each_in_flight(&self, mut f: impl FnMut(&str)) -> Result<usize, EngineError> {
        let mut count = 0;
        for status in [Status::Running, Status::Compensating] {
            let prefix = crate::keys::index_prefix(Some(status));
            let mut after: Option<Vec<u8>> = None;
            loop {
                let page = self
                    .inner
                    .log
                    .projection_scan_prefix(&prefix, after.as_deref(), 1000)
                    .await?;
                let Some((last, _)) = page.last() else { break };
                after = Some(last.to_vec());
                for (key, _) in &page {
                    if let Some(saga_id) = crate::keys::saga_of_index(key) {
                        f(saga_id);
                        count += 1;
                    }
                }
            }
        }
        Ok(count)
    }

    /// Publishes the outbox through `transport` (see `saga_messaging::relay`). Runs until the
    /// task is dropped (entries survive in the log).
    pub async fn run_relay(&self, transport: Arc<dyn Transport>) {
        saga_messaging::relay::run(
            self.inner.log.clone(),
            transport,
            Arc::clone(&self.inner.relay_wake),
        )
        .await
    }
}

/// A driver worker's place, given back if the worker ends without returning (a panic in a
/// pass, a bug: tokio drops the task's future after catching it): the worker count goes down
/// (a drain does not wait for a worker that is gone) and its saga is no longer marked as
/// being driven (a later `drive` runs it again).
struct WorkerSlot {
    engine: Engine,
    /// The saga being driven.
    saga: Option<String>,
    /// Cleared when the worker returns normally (it gave its place back itself).
    armed: bool,
}

impl Drop for WorkerSlot {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let inner = &self.engine.inner;
        let mut drivers = inner
            .drivers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        drivers.workers -= 1;
        if let Some(saga) = &self.saga {
            drivers.scheduled.remove(saga);
            tracing::error!(saga = %saga, "a saga driver ended abnormally; the saga is driven again at its next trigger or the next start");
        }
        if drivers.workers == 0 {
            inner.drivers_idle.notify_waiters();
        }
    }
}

/// Runs `work` in a task of its own and waits for it: dropping the returned future (a caller
/// that went away) leaves the work running to its end. A panic in it is the caller's panic.
async fn detached<T: Send + 'static>(
    work: impl std::future::Future<Output = Result<T, EngineError>> + Send + 'static,
) -> Result<T, EngineError> {
    match tokio::spawn(work).await {
        Ok(result) => result,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        // Cancelled: only when the runtime shuts down.
        Err(_) => Err(EngineError::ShuttingDown),
    }
}

/// The answer to a start whose request id is known: the existing saga when it was started with
/// the same input, otherwise ALREADY_EXISTS.
fn same_or_refused(
    existing: SagaState,
    request_id: &str,
    same: &impl Fn(&SagaState) -> bool,
) -> Result<(SagaState, bool), EngineError> {
    if same(&existing) {
        Ok((existing, false))
    } else {
        Err(EngineError::AlreadyExists {
            request_id: request_id.to_owned(),
            saga_id: existing.saga_id,
        })
    }
}

/// Drives each compensating saga when its acknowledgement deadline passes. Ends when the
/// engine is gone.
async fn run_timers(inner: std::sync::Weak<Inner>, wake: Arc<Notify>) {
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let engine = Engine { inner: strong };
        let now = tokio::time::Instant::now();
        let (due, next) = {
            let mut timers = engine.inner.timers.lock().expect("timers lock");
            let mut due = Vec::new();
            while let Some((at, saga)) = timers.by_time.first().cloned() {
                if at > now {
                    break;
                }
                timers.by_time.pop_first();
                timers.by_saga.remove(&saga);
                due.push(saga);
            }
            (due, timers.by_time.first().map(|(at, _)| *at))
        };
        for saga in &due {
            engine.drive(saga);
        }
        // Wait for the next deadline or a new entry; hold no strong reference meanwhile, and
        // look again at least every second so that a dropped engine ends this task.
        let wake_at = next.unwrap_or(now + TIMER_IDLE_MAX).min(now + TIMER_IDLE_MAX);
        drop(engine);
        let _ = tokio::time::timeout_at(wake_at, wake.notified()).await;
    }
}

/// When a saga whose driver stopped on an error (storage, contention) is driven again.
const DRIVER_RETRY_AFTER: Duration = Duration::from_secs(5);

/// Longest sleep of the timer task.
const TIMER_IDLE_MAX: Duration = Duration::from_secs(1);

/// A subscription to one saga's version changes.
pub struct SagaWatch {
    engine: Engine,
    saga_id: String,
    rx: watch::Receiver<u64>,
}

impl SagaWatch {
    /// Waits for the next change.
    pub async fn changed(&mut self) {
        // The sender lives in the engine's map while any watch exists, so this never errors.
        let _ = self.rx.changed().await;
    }
}

impl Drop for SagaWatch {
    fn drop(&mut self) {
        let mut watchers = self.engine.inner.watchers.lock().expect("watchers lock");
        if watchers
            .get(&self.saga_id)
            .is_some_and(|tx| tx.receiver_count() <= 1)
        {
            watchers.remove(&self.saga_id);
        }
    }
}

/// How a driver pass ended early: a version conflict (decide again from the reloaded stream) or
/// an error. `?` on an append inside a pass ends the pass either way.
enum Pass {
    Conflicted,
    Failed(EngineError),
}

impl<E: Into<EngineError>> From<E> for Pass {
    fn from(error: E) -> Self {
        Pass::Failed(error.into())
    }
}

/// One pass of a saga's driver: the state loaded from the log, the events decided since
/// (`pending`, applied to `state` already) and the stream version the log holds (`durable`).
/// Events are recorded into `pending` and appended at `durable` by [`Driver::flush`], or
/// overlapped with a step call (invariant 1, in `state`).
struct Driver<'e> {
    engine: &'e Engine,
    saga_id: &'e str,
    def: Arc<SagaDefinition>,
    state: SagaState,
    durable: StreamVersion,
    /// The status at `durable` (the metrics' in-flight gauge).
    durable_status: Status,
    pending: Vec<SagaEvent>,
}

impl<'e> Driver<'e> {
    async fn load(engine: &'e Engine, saga_id: &'e str) -> Result<Driver<'e>, EngineError> {
        let state = engine
            .load(saga_id)
            .await?
            .ok_or_else(|| EngineError::NotFound(saga_id.to_owned()))?;
        Ok(Driver {
            engine,
            saga_id,
            def: engine.definition(&state.definition)?,
            durable: state.version,
            durable_status: state.status,
            state,
            pending: Vec::new(),
        })
    }

    fn corrupt(&self, error: FoldError) -> EngineError {
        EngineError::Corrupt {
            saga: self.saga_id.to_owned(),
            error,
        }
    }

    /// Decides `event`: applies it to the state and queues it for the next append.
    fn record(&mut self, event: SagaEvent) -> Result<(), EngineError> {
        self.state
            .apply(&event, now_us())
            .map_err(|error| self.corrupt(error))?;
        self.pending.push(event);
        Ok(())
    }

    /// The new durable version after an append of the pending events; a conflict ends the pass.
    fn settle(&mut self, appended: Result<StreamVersion, StorageError>) -> Result<(), Pass> {
        match appended {
            Ok(version) => {
                // Every recorded event was in the append (flush and the overlapped append take
                // them all), so `state` is the durable state.
                self.durable = version;
                self.durable_status = self.state.status;
                Ok(())
            }
            Err(StorageError::VersionConflict { .. }) => Err(Pass::Conflicted),
            Err(error) => Err(error.into()),
        }
    }

    /// Appends the pending events (and `outbox`, in the same append) at the durable version.
    async fn flush(&mut self, outbox: Vec<OutboxMessage>) -> Result<(), Pass> {
        let events = std::mem::take(&mut self.pending);
        if events.is_empty() && outbox.is_empty() {
            return Ok(());
        }
        let appended = self
            .engine
            .append(
                &self.state.definition,
                self.saga_id,
                self.durable,
                Some(self.durable_status),
                &events,
                outbox,
            )
            .await;
        self.settle(appended)
    }

    /// Decides and acts until the saga waits or is final.
    async fn run(&mut self) -> Result<(), Pass> {
        loop {
            self.take_abort()?;
            match self.state.next(&self.def) {
                Next::Call { .. } if self.engine.is_draining() => {
                    // Shutting down: what was decided becomes durable, the call is left to
                    // the next start's recovery (see `Engine::drain`).
                    self.flush(Vec::new()).await?;
                    return Ok(());
                }
                Next::Call { step, attempt } => self.call(step, attempt).await?,
                Next::GiveUp { step } => {
                    self.record(SagaEvent::StepFailed {
                        step: self.state.steps[step].name.clone(),
                        kind: FailureKind::Unknown,
                        error: "attempts used up; the last attempt's outcome is unknown".into(),
                        retrying: false,
                    })?;
                }
                Next::Compensate { steps } => {
                    let names: Vec<String> =
                        steps.iter().map(|&i| self.state.steps[i].name.clone()).collect();
                    let reason = if self.state.failure_reason.is_empty() {
                        "compensating".to_owned()
                    } else {
                        self.state.failure_reason.clone()
                    };
                    let outbox = self.engine.compensation_messages(&self.state, &self.def, &names);
                    tracing::debug!(steps = ?names, %reason, "compensating");
                    let nothing_to_undo = names.is_empty();
                    self.record(SagaEvent::CompensationRequested { steps: names, reason })?;
                    if nothing_to_undo {
                        self.record(SagaEvent::SagaCompensated)?;
                    }
                    self.flush(outbox).await?;
                }
                Next::Complete => {
                    self.record(SagaEvent::SagaCompleted)?;
                    self.flush(Vec::new()).await?;
                }
                Next::FinishCompensated => {
                    self.record(SagaEvent::SagaCompensated)?;
                    self.flush(Vec::new()).await?;
                }
                Next::MarkStuck { reason } => {
                    tracing::warn!(saga = %self.saga_id, %reason, "saga stuck");
                    self.record(SagaEvent::SagaStuck { reason })?;
                    self.flush(Vec::new()).await?;
                }
                Next::AwaitAcks {
                    open,
                    sent_at_unix_us,
                    republishes,
                } => {
                    let config = &self.engine.inner.config;
                    let deadline_us = config.ack_deadline_unix_us(sent_at_unix_us, republishes);
                    let now = now_us();
                    if now < deadline_us {
                        self.flush(Vec::new()).await?;
                        let wait = Duration::from_micros((deadline_us - now) as u64);
                        self.engine
                            .schedule(self.saga_id, tokio::time::Instant::now() + wait);
                        return Ok(());
                    }
                    let names: Vec<String> = open.iter().map(|&i| self.state.steps[i].name.clone()).collect();
                    if republishes >= config.compensation_republishes_max {
                        let reason = format!(
                            "no acknowledgement of the compensation of {names:?} after {republishes} re-publishes"
                        );
                        tracing::warn!(saga = %self.saga_id, %reason, "saga stuck");
                        self.record(SagaEvent::SagaStuck { reason })?;
                    } else {
                        tracing::info!(saga = %self.saga_id, steps = ?names, republish = republishes + 1, "compensation not acknowledged in time; re-publishing");
                        let outbox = self.engine.compensation_messages(&self.state, &self.def, &names);
                        self.record(SagaEvent::CompensationRepublished {
                            steps: names,
                            republish: republishes + 1,
                        })?;
                        self.flush(outbox).await?;
                        continue;
                    }
                    self.flush(Vec::new()).await?;
                }
                Next::Wait | Next::Done => {
                    self.flush(Vec::new()).await?;
                    return Ok(());
                }
            }
        }
    }

    /// Records an abort an operator asked for, if the saga can still be aborted. Taken on every
    /// pass, so that a request for a saga that left Running meanwhile does not stay in the map.
    fn take_abort(&mut self) -> Result<(), EngineError> {
        let abort = self
            .engine
            .inner
            .aborts
            .lock()
            .expect("aborts lock")
            .remove(self.saga_id);
        if let Some(reason) = abort {
            if self.state.status == Status::Running
                && !self.state.abort_requested
                && self.state.abortable(&self.def)
            {
                self.record(SagaEvent::AbortRequested { reason })?;
            } else {
                tracing::warn!(saga = %self.saga_id, status = %self.state.status, "abort ignored: the saga is past its last compensable step or no longer running");
            }
        }
        Ok(())
    }

    /// Calls a step's action and records its outcome.
    async fn call(&mut self, step: usize, attempt: u32) -> Result<(), Pass> {
        let def = Arc::clone(&self.def);
        let name = self.state.steps[step].name.clone();
        let step_def = def.steps.iter().find(|d| d.name == name).ok_or_else(|| {
            self.corrupt(FoldError::NotInDefinition {
                definition: def.name.clone(),
                step: name.clone(),
            })
        })?;
        // A retry waits its backoff before its start is recorded, with the previous attempt's
        // outcome made durable first (as the overlapped append would have), and calls nothing
        // if a drain began meanwhile (see `Engine::drain`). Not even a zero sleep on a first
        // attempt: a timer rounds up to the next millisecond tick.
        let backoff = step_def.retry.backoff(attempt);
        if !backoff.is_zero() {
            self.flush(Vec::new()).await?;
            tokio::time::sleep(backoff).await;
            if self.engine.is_draining() {
                return Ok(());
            }
        }
        // Invariant 1: a compensable step is called with no append (its start and outcome stay
        // pending until a step without compensation, the end, or a compensation request).
        // Invariant 3: a step without compensation is called for the first time only once its
        // start, and every record before it, is durable; a later attempt (its start is in the
        // log already) overlaps the append of the previous attempt's outcome.
        let ever_started = self.state.steps[step].ever_started;
        let record_first = !step_def.compensable && !ever_started;
        let overlap = !step_def.compensable && ever_started;
        self.record(SagaEvent::StepStarted {
            step: name.clone(),
            attempt,
        })?;
        let outcome = if overlap {
            let events = std::mem::take(&mut self.pending);
            let (appended, outcome) = tokio::join!(
                self.engine.append(
                    &self.state.definition,
                    self.saga_id,
                    self.durable,
                    Some(self.durable_status),
                    &events,
                    Vec::new()
                ),
                self.engine.call(self.saga_id, step_def, &self.state.payload)
            );
            self.settle(appended)?;
            outcome
        } else {
            if record_first {
                self.flush(Vec::new()).await?;
            }
            self.engine
                .call(self.saga_id, step_def, &self.state.payload)
                .await
        };
        tracing::debug!(step = %name, attempt, ok = outcome.is_ok(), "step answered");
        let attempts_left = attempt < step_def.retry.attempts_max;
        self.record(match outcome {
            Ok(()) => SagaEvent::StepSucceeded { step: name },
            Err(StepError::Business(error)) => SagaEvent::StepFailed {
                step: name,
                kind: FailureKind::Business,
                error,
                retrying: false,
            },
            Err(StepError::Transient(error)) => SagaEvent::StepFailed {
                step: name,
                kind: FailureKind::Transient,
                error,
                retrying: attempts_left,
            },
            // A step that cannot be undone is retried rather than compensated.
            Err(StepError::Unknown(error)) => SagaEvent::StepFailed {
                step: name,
                kind: FailureKind::Unknown,
                error,
                retrying: !step_def.compensable && attempts_left,
            },
        })?;
        Ok(())
    }
}

/// Applies acknowledgements from the acknowledgement topic.
pub struct AckHandler {
    pub engine: Engine,
}

impl Handler for AckHandler {
    fn handle(&self, delivery: Delivery) -> BoxFuture<'static, Outcome> {
        let engine = self.engine.clone();
        Box::pin(async move {
            crate::metric::acks_received("topic", 1);
            let ack = match pb::CompensationAck::decode(delivery.body.as_slice()) {
                Ok(ack) => ack,
                Err(error) => {
                    // Retrying cannot make it decode; it is logged and dropped from the topic
                    // (the participant's consumer log still has the outcome).
                    tracing::error!(key = %delivery.key, %error, "undecodable acknowledgement");
                    return Outcome::Consumed;
                }
            };
            let span = saga_proto::trace::saga_span(
                "ack",
                ack.key.as_ref().map_or("", |k| k.saga_id.as_str()),
                saga_messaging::topics::delivery_trace(&delivery),
            );
            let applied = tracing::Instrument::instrument(engine.on_ack(&ack), span.clone()).await;
            span.in_scope(|| {
                tracing::debug!(
                    step = ack.key.as_ref().map_or("", |k| k.step.as_str()),
                    outcome = ack.outcome,
                    "acknowledgement handled"
                )
            });
            match applied {
                Ok(true) => Outcome::Consumed,
                Ok(false) => {
                    let (saga, step) = ack
                        .key
                        .as_ref()
                        .map_or(("", ""), |k| (k.saga_id.as_str(), k.step.as_str()));
                    tracing::error!(%saga, %step, node = %engine.inner.config.node_id, "{MISROUTED_ACK}");
                    Outcome::Consumed
                }
                Err(error) => {
                    tracing::warn!(key = %delivery.key, %error, "acknowledgement not applied; retry later");
                    Outcome::RetryLater
                }
            }
        })
    }
}

impl From<Contended> for EngineError {
    fn from(contended: Contended) -> Self {
        EngineError::Contended(contended.to_string())
    }
}

//! The `saga.v1.Orchestrator` gRPC service: validation (INVALID_ARGUMENT names the field),
//! status mapping, and the two server streams (WatchSaga, ReplayEvents).

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prost::Message as _;
use saga_proto::auth::AdminToken;
use saga_proto::v1 as pb;
use saga_storage::{Position, StorageError, StreamVersion};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::engine::{Engine, EngineError};
use crate::events::SagaEvent;
use crate::order;
use crate::state::{Phase, SagaState, Status as SagaStatus};

use saga_proto::ids::{ID_LEN_MAX, REQUEST_ID_LEN_MAX};
pub const ITEMS_MAX: usize = 64;
pub const PAGE_SIZE_MAX: u32 = 1000;
const PAGE_SIZE_DEFAULT: u32 = 100;
/// Records per read while streaming the log, and messages buffered per stream.
pub const STREAM_CHUNK: usize = 256;
/// Longest operator reason.
const REASON_LEN_MAX: usize = 1024;
/// Most acknowledgements in one AcknowledgeCompensations call.
pub const ACKS_MAX: usize = 1024;

pub struct OrchestratorService {
    pub engine: Engine,
    /// Admits RetrySaga, AbortSaga and ReplayEvents (`saga_proto::auth`).
    pub admin: AdminToken,
    /// Set once recovery ran (`crate::node`); before that every call is UNAVAILABLE.
    pub ready: Arc<AtomicBool>,
}

use saga_proto::status::invalid_argument as invalid;

/// An id (`saga_proto::ids`); an optional one may be empty.
fn check_id(field: &str, value: &str, len_max: usize, required: bool) -> Result<(), Status> {
    if value.is_empty() && !required {
        return Ok(());
    }
    saga_proto::ids::check_len(value, len_max).map_err(|why| invalid(field, why))
}

fn check_reason(reason: &str) -> Result<(), Status> {
    if reason.len() > REASON_LEN_MAX {
        return Err(invalid("reason", format!("longer than {REASON_LEN_MAX} bytes")));
    }
    Ok(())
}

/// Checks a StartOrder request; the first bad field is named.
pub fn validate_start(request: &pb::StartOrderRequest) -> Result<(), Status> {
    check_id("request_id", &request.request_id, REQUEST_ID_LEN_MAX, true)?;
    check_id("user_id", &request.user_id, ID_LEN_MAX, true)?;
    if request.items.is_empty() {
        return Err(invalid("items", "at least one item is needed"));
    }
    if request.items.len() > ITEMS_MAX {
        return Err(invalid("items", format!("more than {ITEMS_MAX} items")));
    }
    for (i, item) in request.items.iter().enumerate() {
        check_id(
            &format!("items[{i}].product_id"),
            &item.product_id,
            ID_LEN_MAX,
            true,
        )?;
        if item.quantity <= 0 {
            return Err(invalid(&format!("items[{i}].quantity"), "must be positive"));
        }
        if request.items[..i].iter().any(|o| o.product_id == item.product_id) {
            return Err(invalid(
                &format!("items[{i}].product_id"),
                "a product may appear once",
            ));
        }
    }
    if request.amount_minor <= 0 {
        return Err(invalid("amount_minor", "must be positive"));
    }
    check_id("coupon_id", &request.coupon_id, ID_LEN_MAX, false)
}

fn engine_status(error: EngineError) -> Status {
    match error {
        EngineError::NotFound(saga) => Status::not_found(format!("saga {saga} not found")),
        EngineError::Precondition(text) => Status::failed_precondition(text),
        EngineError::Contended(text) => Status::unavailable(format!("contended: {text}")),
        error @ EngineError::AlreadyExists { .. } => Status::already_exists(error.to_string()),
        EngineError::Storage(StorageError::Closed) => Status::unavailable("the orchestrator is stopping"),
        error @ EngineError::ShuttingDown => Status::unavailable(error.to_string()),
        other => Status::internal(other.to_string()),
    }
}

fn step_state(phase: Phase) -> pb::StepState {
    match phase {
        Phase::Pending => pb::StepState::Pending,
        Phase::Running => pb::StepState::Running,
        Phase::Succeeded => pb::StepState::Succeeded,
        Phase::Failed(_) => pb::StepState::Failed,
        Phase::Skipped => pb::StepState::Skipped,
        Phase::Compensating => pb::StepState::Compensating,
        Phase::Compensated => pb::StepState::Compensated,
        Phase::CompensationParked => pb::StepState::CompensationParked,
    }
}

/// A saga as the API shows it.
pub fn saga_to_proto(state: &SagaState) -> pb::Saga {
    let mut order = pb::OrderDetails::decode(state.payload.as_slice()).unwrap_or_default();
    order.order_id = state.saga_id.clone();
    pb::Saga {
        saga_id: state.saga_id.clone(),
        request_id: state.request_id.clone(),
        state: pb::SagaState::from(state.status) as i32,
        order: Some(order),
        steps: state
            .steps
            .iter()
            .map(|s| pb::StepStatus {
                name: s.name.clone(),
                state: step_state(s.phase) as i32,
                attempts: s.attempts,
                last_error: s.last_error.clone(),
            })
            .collect(),
        version: state.version.get(),
        started_at_unix_ms: state.started_at_unix_us / 1000,
        updated_at_unix_ms: state.updated_at_unix_us / 1000,
        failure_reason: state.failure_reason.clone(),
    }
}

/// A stored record as ReplayEvents shows it; the payload is rendered as JSON when it is a saga
/// event.
pub fn log_event(record: &saga_storage::Record) -> pb::LogEvent {
    let payload_json = record
        .decode::<SagaEvent>()
        .ok()
        .and_then(|e| serde_json::to_string(&e).ok())
        .unwrap_or_default();
    pb::LogEvent {
        position: record.position().get(),
        stream: record.stream().to_owned(),
        version: record.version().get(),
        event_type: record.event_type().to_owned(),
        timestamp_unix_us: record.timestamp_us(),
        payload: record.payload().to_vec(),
        payload_json,
        checksum: record.checksum(),
        prev_checksum: record.prev_checksum(),
    }
}

impl OrchestratorService {
    /// UNAVAILABLE until recovery ran: a call must not race the resumption of its saga.
    fn check_ready(&self) -> Result<(), Status> {
        if self.ready.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(Status::unavailable(
                "recovering: the orchestrator is resuming unfinished sagas; try again",
            ))
        }
    }

    /// An admin call: recovery ran and the bearer token is right.
    fn check_admin<T>(&self, request: &Request<T>) -> Result<(), Status> {
        self.admin.check(request.metadata())?;
        self.check_ready()
    }

    async fn get(&self, saga_id: &str) -> Result<SagaState, Status> {
        check_id("saga_id", saga_id, ID_LEN_MAX, true)?;
        self.engine
            .load(saga_id)
            .await
            .map_err(engine_status)?
            .ok_or_else(|| Status::not_found(format!("saga {saga_id} not found")))
    }
}

type EventStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::orchestrator_server::Orchestrator for OrchestratorService {
    async fn start_order(
        &self,
        request: Request<pb::StartOrderRequest>,
    ) -> Result<Response<pb::StartOrderResponse>, Status> {
        self.check_ready()?;
        let request = request.into_inner();
        validate_start(&request)?;
        let details = pb::OrderDetails {
            order_id: String::new(),
            user_id: request.user_id,
            items: request.items,
            amount_minor: request.amount_minor,
            coupon_id: request.coupon_id,
        };
        let skipped = order::skipped_steps(&details);
        let (state, created) = self
            .engine
            .start(
                order::DEFINITION,
                &request.request_id,
                details.encode_to_vec(),
                skipped,
            )
            .await
            .map_err(engine_status)?;
        Ok(Response::new(pb::StartOrderResponse {
            saga: Some(saga_to_proto(&state)),
            created,
        }))
    }

    async fn get_saga(
        &self,
        request: Request<pb::GetSagaRequest>,
    ) -> Result<Response<pb::GetSagaResponse>, Status> {
        self.check_ready()?;
        let state = self.get(&request.into_inner().saga_id).await?;
        Ok(Response::new(pb::GetSagaResponse {
            saga: Some(saga_to_proto(&state)),
        }))
    }

    async fn list_sagas(
        &self,
        request: Request<pb::ListSagasRequest>,
    ) -> Result<Response<pb::ListSagasResponse>, Status> {
        self.check_ready()?;
        let request = request.into_inner();
        let status = match pb::SagaState::try_from(request.state) {
            Ok(pb::SagaState::Unspecified) => None,
            Ok(state) => SagaStatus::ALL
                .into_iter()
                .find(|s| pb::SagaState::from(*s) == state),
            Err(_) => return Err(invalid("state", format!("unknown state {}", request.state))),
        };
        let page_size = match request.page_size {
            0 => PAGE_SIZE_DEFAULT,
            n if n > PAGE_SIZE_MAX => return Err(invalid("page_size", format!("at most {PAGE_SIZE_MAX}"))),
            n => n,
        } as usize;
        let prefix = crate::keys::index_prefix(status);
        if !request.page_token.is_empty() && !request.page_token.starts_with(&prefix) {
            return Err(invalid("page_token", "not a token of this listing"));
        }
        let after = (!request.page_token.is_empty()).then_some(request.page_token.as_bytes());
        let page = self
            .engine
            .log()
            .projection_scan_prefix(&prefix, after, page_size + 1)
            .await
            .map_err(|e| engine_status(e.into()))?;
        let more = page.len() > page_size;
        let mut sagas = Vec::with_capacity(page_size.min(page.len()));
        let mut last_key = String::new();
        for (key, _) in page.iter().take(page_size) {
            let Some(saga_id) = crate::keys::saga_of_index(key) else {
                continue;
            };
            if let Some(state) = self.engine.load(saga_id).await.map_err(engine_status)? {
                sagas.push(saga_to_proto(&state));
            }
            last_key = String::from_utf8_lossy(key).into_owned();
        }
        Ok(Response::new(pb::ListSagasResponse {
            sagas,
            next_page_token: if more { last_key } else { String::new() },
        }))
    }

    type WatchSagaStream = EventStream<pb::SagaEvent>;

    async fn watch_saga(
        &self,
        request: Request<pb::WatchSagaRequest>,
    ) -> Result<Response<Self::WatchSagaStream>, Status> {
        self.check_ready()?;
        let request = request.into_inner();
        check_id("saga_id", &request.saga_id, ID_LEN_MAX, true)?;
        let saga_id = request.saga_id;
        let from_version = request.from_version.max(1);
        let changes_only = request.status_changes_only;
        // Subscribe before the first read, so that no change between them is missed.
        let mut watch = self.engine.watch(&saga_id);
        let log = self.engine.log().clone();
        if log
            .stream_version(&saga_id)
            .await
            .map_err(|e| engine_status(e.into()))?
            == 0
        {
            return Err(Status::not_found(format!("saga {saga_id} not found")));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_CHUNK);
        tokio::spawn(async move {
            let mut state: Option<SagaState> = None;
            let mut next = StreamVersion::FIRST;
            loop {
                let records = match log.read_stream(&saga_id, next, STREAM_CHUNK).await {
                    Ok(records) => records,
                    Err(e) => {
                        let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                        return;
                    }
                };
                for record in &records {
                    next = record.version().next();
                    let event = match record.decode::<SagaEvent>() {
                        Ok(event) => event,
                        Err(e) => {
                            let _ = tx.send(Err(Status::internal(e.to_string()))).await;
                            return;
                        }
                    };
                    let before = state.as_ref().map(|s| s.status);
                    let folded = match state.as_mut() {
                        None => SagaState::fold(&saga_id, [(event.clone(), record.timestamp_us())])
                            .map(|s| state = Some(s.expect("one event folds to a state or an error"))),
                        Some(s) => s.apply(&event, record.timestamp_us()),
                    };
                    if let Err(error) = folded {
                        let _ = tx.send(Err(Status::internal(error.to_string()))).await;
                        return;
                    }
                    let status = state.as_ref().expect("folded").status;
                    // With `status_changes_only`, an event that leaves the state as it was
                    // is folded and not sent (SagaStarted changes it from none).
                    let sent = !changes_only || before != Some(status);
                    if record.version() >= from_version && sent {
                        let message = pb::SagaEvent {
                            saga_id: saga_id.clone(),
                            version: record.version().get(),
                            position: record.position().get(),
                            event_type: record.event_type().to_owned(),
                            timestamp_unix_us: record.timestamp_us(),
                            state: pb::SagaState::from(status) as i32,
                            step: event.step().unwrap_or_default().to_owned(),
                            detail: event.detail(),
                        };
                        if tx.send(Ok(message)).await.is_err() {
                            return;
                        }
                    }
                    if status.is_final() {
                        return;
                    }
                }
                if records.len() < STREAM_CHUNK {
                    // Read to the end (a short read, possibly empty after a full chunk). A saga
                    // STUCK at its last event ends the stream once that event was sent (final
                    // for now: an operator's RetrySaga, or a late acknowledgement, moves it on;
                    // a new watch from the next version follows that).
                    let stuck = state.as_ref().is_some_and(|s| s.status == SagaStatus::Stuck);
                    if stuck && next.get() > from_version {
                        return;
                    }
                    tokio::select! {
                        _ = watch.changed() => {}
                        _ = tx.closed() => return,
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    type ReplayEventsStream = EventStream<pb::LogEvent>;

    async fn replay_events(
        &self,
        request: Request<pb::ReplayEventsRequest>,
    ) -> Result<Response<Self::ReplayEventsStream>, Status> {
        self.check_admin(&request)?;
        let request = request.into_inner();
        let follow = request.follow;
        let log = self.engine.log().clone();
        // Without `follow`, the replay ends at the log's end as of this call.
        let end = log.durable_position();
        let mut subscription = log.subscribe(Position::new(request.from_position));
        let (tx, rx) = tokio::sync::mpsc::channel(STREAM_CHUNK);
        tokio::spawn(async move {
            loop {
                if !follow && subscription.next_position() > end {
                    return;
                }
                let record = tokio::select! {
                    record = subscription.next() => record,
                    _ = tx.closed() => return,
                };
                let message = record
                    .map(|r| log_event(&r))
                    .map_err(|e| Status::internal(e.to_string()));
                let failed = message.is_err();
                if tx.send(message).await.is_err() || failed {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn retry_saga(
        &self,
        request: Request<pb::RetrySagaRequest>,
    ) -> Result<Response<pb::RetrySagaResponse>, Status> {
        self.check_admin(&request)?;
        let request = request.into_inner();
        check_id("saga_id", &request.saga_id, ID_LEN_MAX, true)?;
        check_reason(&request.reason)?;
        let state = self
            .engine
            .retry(&request.saga_id, &request.reason)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(pb::RetrySagaResponse {
            saga: Some(saga_to_proto(&state)),
        }))
    }

    async fn abort_saga(
        &self,
        request: Request<pb::AbortSagaRequest>,
    ) -> Result<Response<pb::AbortSagaResponse>, Status> {
        self.check_admin(&request)?;
        let request = request.into_inner();
        check_id("saga_id", &request.saga_id, ID_LEN_MAX, true)?;
        check_reason(&request.reason)?;
        let state = self
            .engine
            .abort(&request.saga_id, &request.reason)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(pb::AbortSagaResponse {
            saga: Some(saga_to_proto(&state)),
        }))
    }

    async fn acknowledge_compensations(
        &self,
        request: Request<pb::AcknowledgeCompensationsRequest>,
    ) -> Result<Response<pb::AcknowledgeCompensationsResponse>, Status> {
        self.check_ready()?;
        let Some(endpoint) = self.engine.ack_endpoint() else {
            return Err(Status::failed_precondition(
                "acknowledgements over gRPC are off (start with --ack-endpoint): publish them on the acknowledgement topic",
            ));
        };
        let acks = request.into_inner().acks;
        if acks.len() > ACKS_MAX {
            return Err(invalid("acks", format!("more than {ACKS_MAX}")));
        }
        for (i, ack) in acks.iter().enumerate() {
            let Some(key) = &ack.key else {
                return Err(invalid(&format!("acks[{i}].key"), "missing"));
            };
            check_id(&format!("acks[{i}].key.saga_id"), &key.saga_id, ID_LEN_MAX, true)?;
            check_id(&format!("acks[{i}].key.step"), &key.step, ID_LEN_MAX, true)?;
            // Authentication: each ack carries the token its request named (`crate::ack_key`);
            // another node's acks (an address that served it before) do not verify either.
            if !endpoint.key.verify(&key.saga_id, &key.step, &ack.ack_token) {
                return Err(Status::permission_denied(format!(
                    "acks[{i}].ack_token is not this orchestrator's token for {}:{}",
                    key.saga_id, key.step
                )));
            }
        }
        crate::metric::acks_received("grpc", acks.len());
        // The acks of one saga in their order (they would conflict if applied together), the
        // sagas side by side, each in a task of its own that runs to its end even if this call
        // is dropped (a caller that gives up, or an error of another saga's acks): an ack's
        // effects (its append, the drive after a resumption) are never cut short. The caller
        // sends again what it was not told was applied; applying an ack twice changes nothing.
        let mut by_saga: std::collections::HashMap<String, Vec<(u32, pb::CompensationAck)>> =
            std::collections::HashMap::new();
        for (index, ack) in (0u32..).zip(acks) {
            let saga = ack.key.as_ref().map(|k| k.saga_id.clone()).unwrap_or_default();
            by_saga.entry(saga).or_default().push((index, ack));
        }
        let tasks: Vec<_> = by_saga
            .into_iter()
            .map(|(saga, group)| {
                let engine = self.engine.clone();
                tokio::spawn(async move {
                    let mut not_owned = Vec::new();
                    for (index, ack) in &group {
                        let span = saga_proto::trace::saga_span("ack", &saga, None);
                        if !tracing::Instrument::instrument(engine.on_ack(ack), span).await? {
                            not_owned.push(*index);
                        }
                    }
                    Ok::<Vec<u32>, EngineError>(not_owned)
                })
            })
            .collect();
        let mut not_owned = Vec::new();
        for task in tasks {
            match task.await {
                Ok(Ok(indices)) => not_owned.extend(indices),
                Ok(Err(error)) => {
                    tracing::warn!(%error, "acknowledgement not applied; the participant sends it again");
                    return Err(engine_status(error));
                }
                Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                Err(_) => return Err(Status::unavailable("the orchestrator is stopping")),
            }
        }
        if !not_owned.is_empty() {
            // Tokens of ours for sagas this log does not have (it lost them, or another node
            // runs with a copy of this one's directory): the participant publishes them on the
            // acknowledgement topic, which routes by the owner's node id, and they are loud
            // there if nobody has them either.
            not_owned.sort_unstable();
            tracing::warn!(
                count = not_owned.len(),
                "acknowledgements for sagas this orchestrator does not have: sent back"
            );
        }
        Ok(Response::new(pb::AcknowledgeCompensationsResponse { not_owned }))
    }
}

/// The orchestrator's routes: the API, standard health checking (NOT_SERVING until the caller
/// says otherwise, see `crate::node`) and server reflection listing exactly these services.
pub async fn routes(
    engine: Engine,
    admin: AdminToken,
    ready: Arc<AtomicBool>,
) -> Result<(tonic::service::Routes, saga_proto::server::Standard), tonic_reflection::server::Error> {
    type Server = pb::orchestrator_server::OrchestratorServer<OrchestratorService>;
    let routes = tonic::service::Routes::new(
        Server::new(OrchestratorService { engine, admin, ready })
            .max_decoding_message_size(saga_proto::REQUEST_LEN_MAX),
    );
    saga_proto::server::with_standard_services(routes, &[saga_proto::server::name_of::<Server>()]).await
}

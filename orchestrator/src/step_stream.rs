//! Step calls over a participant's `StepCalls.Steps` stream (participants.proto): one
//! long-lived HTTP/2 stream per participant carries every step call to it, one message each way,
//! instead of one HTTP/2 request per call (headers, body, trailers on both sides).
//!
//! What a caller sees is what a unary call gives: the participant's status (its code, message
//! and details, so refusals classify the same), `DEADLINE_EXCEEDED` when the call's deadline
//! passes first, and `UNAVAILABLE` when the stream cannot be opened or breaks before the call is
//! answered. Crash windows are those of a unary call:
//! - the stream breaks (either side died, the connection dropped) after a call was sent: the
//!   call's outcome is unknown; it is answered `UNAVAILABLE`, which the engine retries with the
//!   same key, and the participant's barrier answers a repeat with its first outcome;
//! - a reply arrives after its caller's deadline: it is dropped, and the caller had classified
//!   the call as a missed deadline (outcome unknown), as for a unary call;
//! - the orchestrator dies: the participant finishes the calls it received and their replies go
//!   nowhere; recovery repeats them with the same keys.
//!
//! No call is ever left waiting: a call is registered only while its stream is open (under the
//! lock the stream's reader takes to close it and fail everything registered), so every call is
//! answered by its reply, by the stream's end, or by its deadline.
//!
//! A participant that does not serve `StepCalls` (a version before it) answers the stream
//! `UNIMPLEMENTED`; the caller then uses the unary RPCs for that participant
//! ([`StepStream::call`] returns [`Unserved`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use saga_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

/// The participant does not serve `StepCalls`: call its unary RPC instead (the call, unsent).
#[derive(Debug)]
pub struct Unserved(pub pb::step_call::Call);

/// One participant's step stream, opened on first use and again after it broke.
pub struct StepStream {
    client: pb::step_calls_client::StepCallsClient<Channel>,
    /// The open stream, if any (a plain lock: held for a clone, never across an await).
    current: Mutex<Option<Arc<Lane>>>,
    /// Held while a stream is being opened, so that concurrent callers open one.
    opening: tokio::sync::Mutex<()>,
    /// Set when the participant answered the stream `UNIMPLEMENTED`.
    unserved: AtomicBool,
    next_id: AtomicU64,
}

type Waiter = oneshot::Sender<Result<(), Status>>;

/// An open stream: where calls are sent, and who waits for which reply. Only the
/// [`StepStream`] holds the sending half: when it is dropped the request stream ends, and the
/// participant ends its side (the reader holds `pending` only).
struct Lane {
    calls: mpsc::UnboundedSender<pb::StepCall>,
    pending: Arc<Mutex<Pending>>,
}

struct Pending {
    /// False once the stream ended: nothing may register any more.
    open: bool,
    waiting: HashMap<u64, Waiter>,
}

impl Lane {
    fn is_open(&self) -> bool {
        self.pending.lock().expect("step stream lock").open
    }

    /// Registers call `id`; `false` when the stream has ended.
    fn register(&self, id: u64, waiter: Waiter) -> bool {
        let mut pending = self.pending.lock().expect("step stream lock");
        if pending.open {
            pending.waiting.insert(id, waiter);
        }
        pending.open
    }
}

/// A registered call's entry, removed when the call's future ends however it ends.
struct Registered {
    pending: Arc<Mutex<Pending>>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.waiting.remove(&self.id);
        }
    }
}

impl StepStream {
    pub fn new(channel: Channel) -> StepStream {
        StepStream {
            client: pb::step_calls_client::StepCallsClient::new(channel),
            current: Mutex::new(None),
            opening: tokio::sync::Mutex::new(()),
            unserved: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
        }
    }

    /// Calls `call` with the saga's `traceparent`, answered within `timeout`: the participant's
    /// outcome, `DEADLINE_EXCEEDED` or `UNAVAILABLE` (see the module doc).
    pub async fn call(
        &self,
        call: pb::step_call::Call,
        traceparent: String,
        timeout: Duration,
    ) -> Result<Result<(), Status>, Unserved> {
        if self.unserved.load(Ordering::Relaxed) {
            return Err(Unserved(call));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (waiter, answer) = oneshot::channel();
        let deadline_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX).max(1);
        let attempt = async {
            let lane = match self.lane().await {
                Ok(lane) => lane,
                Err(status) if status.code() == Code::Unimplemented => return Err(Unserved(call)),
                Err(status) => return Ok(Err(status)),
            };
            if !lane.register(id, waiter) {
                return Ok(Err(Status::unavailable("the step stream ended")));
            }
            // From here the call is registered: however this future ends (answered, past its
            // deadline, or dropped by the engine's own timer), its entry goes with it, and a
            // reply after that is dropped by the reader (nobody waits for its id).
            let _registered = Registered {
                pending: Arc::clone(&lane.pending),
                id,
            };
            let message = pb::StepCall {
                id,
                traceparent,
                deadline_ms,
                call: Some(call),
            };
            if lane.calls.send(message).is_err() {
                return Ok(Err(Status::unavailable("the step stream ended")));
            }
            let result = answer
                .await
                .unwrap_or_else(|_| Err(Status::unavailable("the step stream ended")));
            Ok(result)
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(result)) => Ok(result),
            Ok(Err(unserved)) => {
                tracing::warn!("the participant does not serve StepCalls: unary step calls to it");
                self.unserved.store(true, Ordering::Relaxed);
                Err(unserved)
            }
            Err(_elapsed) => Ok(Err(Status::deadline_exceeded("Timeout expired"))),
        }
    }

    /// Calls registered on the open stream and not answered yet.
    pub fn waiting(&self) -> usize {
        self.open_lane().map_or(0, |lane| {
            lane.pending.lock().expect("step stream lock").waiting.len()
        })
    }

    /// The open stream, or a new one.
    async fn lane(&self) -> Result<Arc<Lane>, Status> {
        if let Some(lane) = self.open_lane() {
            return Ok(lane);
        }
        let _opening = self.opening.lock().await;
        if let Some(lane) = self.open_lane() {
            return Ok(lane);
        }
        let (calls, outgoing) = mpsc::unbounded_channel();
        let lane = Arc::new(Lane {
            calls,
            pending: Arc::new(Mutex::new(Pending {
                open: true,
                waiting: HashMap::new(),
            })),
        });
        let mut client = self.client.clone();
        let replies = client
            .steps(UnboundedReceiverStream::new(outgoing))
            .await?
            .into_inner();
        tokio::spawn(read_replies(Arc::clone(&lane.pending), replies));
        *self.current.lock().expect("step stream lock") = Some(Arc::clone(&lane));
        Ok(lane)
    }

    fn open_lane(&self) -> Option<Arc<Lane>> {
        self.current
            .lock()
            .expect("step stream lock")
            .as_ref()
            .filter(|lane| lane.is_open())
            .cloned()
    }
}

/// Hands each reply to its caller until the stream ends, then closes the lane and answers
/// every call still waiting `UNAVAILABLE` (their outcomes are unknown: see the module doc).
async fn read_replies(pending: Arc<Mutex<Pending>>, mut replies: Streaming<pb::StepReply>) {
    let ended = loop {
        match replies.message().await {
            Ok(Some(reply)) => {
                let waiter = pending
                    .lock()
                    .expect("step stream lock")
                    .waiting
                    .remove(&reply.id);
                // No waiter: its caller's deadline passed (it classified the call already).
                if let Some(waiter) = waiter {
                    let _ = waiter.send(status_of(reply));
                }
            }
            Ok(None) => break "the participant ended the step stream".to_owned(),
            Err(status) => break format!("the step stream broke: {status}"),
        }
    };
    let waiting = {
        let mut pending = pending.lock().expect("step stream lock");
        pending.open = false;
        std::mem::take(&mut pending.waiting)
    };
    if !waiting.is_empty() {
        tracing::warn!(calls = waiting.len(), %ended, "step calls answered UNAVAILABLE");
    }
    for waiter in waiting.into_values() {
        let _ = waiter.send(Err(Status::unavailable(ended.clone())));
    }
}

/// The unary call's status a reply stands for.
fn status_of(reply: pb::StepReply) -> Result<(), Status> {
    match Code::from(reply.code) {
        Code::Ok => Ok(()),
        code => Err(Status::with_details(code, reply.message, reply.details.into())),
    }
}

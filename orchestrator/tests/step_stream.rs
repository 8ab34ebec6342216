//! The orchestrator's side of a participant's step stream (`saga_orchestrator::step_stream`)
//! against a scripted `StepCalls` server on loopback: every call is answered by its reply, its
//! deadline or the stream's end, never left waiting; a broken stream is reopened by the next
//! call; a participant without `StepCalls` gets its calls back for the unary RPC.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use saga_orchestrator::engine::StepError;
use saga_orchestrator::order::classify;
use saga_orchestrator::step_stream::{StepStream, Unserved};
use saga_proto::v1 as pb;
use tokio_stream::Stream;
use tonic::transport::Channel;
use tonic::{Code, Request, Response, Status, Streaming};

/// Answers each call by its `order_id` (a ConfirmOrder): `ok`, `refuse` (a recorded business
/// refusal), `hold` (never answered), `break` (the stream ends with an error, unanswered).
#[derive(Default)]
struct Scripted {
    streams_opened: Arc<AtomicUsize>,
    /// How many `hold` calls the server has received.
    held: Arc<tokio::sync::watch::Sender<usize>>,
}

#[tonic::async_trait]
impl pb::step_calls_server::StepCalls for Scripted {
    type StepsStream = Pin<Box<dyn Stream<Item = Result<pb::StepReply, Status>> + Send + 'static>>;

    async fn steps(
        &self,
        request: Request<Streaming<pb::StepCall>>,
    ) -> Result<Response<Self::StepsStream>, Status> {
        self.streams_opened.fetch_add(1, Ordering::SeqCst);
        let mut calls = request.into_inner();
        let (replies, answers) = tokio::sync::mpsc::unbounded_channel();
        let held = Arc::clone(&self.held);
        tokio::spawn(async move {
            while let Ok(Some(call)) = calls.message().await {
                let Some(pb::step_call::Call::ConfirmOrder(confirm)) = call.call else {
                    panic!("the tests send ConfirmOrder only");
                };
                let status = match confirm.order_id.as_str() {
                    "ok" => Status::ok(""),
                    "refuse" => saga_proto::status::refused(pb::RefusalReason::InvalidState, "scripted"),
                    "hold" => {
                        held.send_modify(|n| *n += 1);
                        continue;
                    }
                    "break" => {
                        let _ = replies.send(Err(Status::internal("scripted break")));
                        return;
                    }
                    other => panic!("unscripted {other}"),
                };
                let _ = replies.send(Ok(pb::StepReply {
                    id: call.id,
                    code: status.code() as i32,
                    message: status.message().to_owned(),
                    details: status.details().to_vec(),
                }));
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::UnboundedReceiverStream::new(answers),
        )))
    }
}

/// Serves `routes` on loopback; the server stops when the returned sender is dropped.
async fn serve(routes: tonic::service::Routes) -> (Channel, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(saga_proto::server::serve(routes, listener, async {
        let _ = stopped.await;
    }));
    let channel = saga_orchestrator::order::lazy_channel(&addr.to_string(), None).unwrap();
    (channel, stop)
}

struct Running {
    opened: Arc<AtomicUsize>,
    held: tokio::sync::watch::Receiver<usize>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

async fn scripted() -> (StepStream, Running) {
    let server = Scripted::default();
    let opened = Arc::clone(&server.streams_opened);
    let held = server.held.subscribe();
    let (channel, stop) = serve(tonic::service::Routes::new(
        pb::step_calls_server::StepCallsServer::new(server),
    ))
    .await;
    let running = Running {
        opened,
        held,
        _stop: stop,
    };
    (StepStream::new(channel), running)
}

fn confirm(what: &str) -> pb::step_call::Call {
    pb::step_call::Call::ConfirmOrder(pb::ConfirmOrderRequest {
        key: None,
        order_id: what.into(),
    })
}

async fn call(steps: &StepStream, what: &str, timeout: Duration) -> Result<(), Status> {
    match steps.call(confirm(what), String::new(), timeout).await {
        Ok(result) => result,
        Err(Unserved(_)) => panic!("the scripted server serves StepCalls"),
    }
}

const LONG: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_reply_carries_the_participants_status_and_its_details() {
    let (steps, server) = scripted().await;
    call(&steps, "ok", LONG).await.expect("ok");
    let refused = call(&steps, "refuse", LONG).await.expect_err("refused");
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(
        matches!(classify(&refused, 1000), StepError::Business(_)),
        "a recorded refusal stays a business failure: {refused:?}"
    );
    call(&steps, "ok", LONG).await.expect("ok");
    assert_eq!(
        server.opened.load(Ordering::SeqCst),
        1,
        "one stream for every call"
    );
}

#[tokio::test]
async fn a_call_past_its_deadline_is_deadline_exceeded_and_the_stream_goes_on() {
    let (steps, server) = scripted().await;
    let held = call(&steps, "hold", Duration::from_millis(100))
        .await
        .expect_err("never answered");
    assert_eq!(held.code(), Code::DeadlineExceeded);
    assert!(matches!(classify(&held, 100), StepError::Unknown(_)), "{held:?}");
    call(&steps, "ok", LONG).await.expect("the stream is still open");
    assert_eq!(server.opened.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_broken_stream_answers_every_waiting_call_unavailable_and_the_next_call_reopens_it() {
    let (steps, mut server) = scripted().await;
    let steps = Arc::new(steps);
    let began = Instant::now();
    let waiting: Vec<_> = (0..3)
        .map(|_| {
            let steps = Arc::clone(&steps);
            tokio::spawn(async move { call(&steps, "hold", LONG).await })
        })
        .collect();
    // The held calls are on the stream before it breaks.
    server.held.wait_for(|held| *held == 3).await.unwrap();
    call(&steps, "ok", LONG).await.expect("ok");
    let broken = call(&steps, "break", LONG).await.expect_err("broken");
    assert_eq!(broken.code(), Code::Unavailable, "{broken:?}");
    for held in waiting {
        let held = held.await.unwrap().expect_err("unanswered");
        assert_eq!(held.code(), Code::Unavailable, "{held:?}");
        assert!(
            matches!(classify(&held, 1000), StepError::Transient(_)),
            "retried with the same key: {held:?}"
        );
    }
    assert!(
        began.elapsed() < LONG / 2,
        "answered by the break, not a deadline"
    );
    call(&steps, "ok", LONG).await.expect("a new stream");
    assert_eq!(server.opened.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_participant_without_step_calls_gets_its_calls_back_for_the_unary_rpc() {
    let (routes, _standard) =
        saga_proto::server::with_standard_services(tonic::service::Routes::default(), &[])
            .await
            .unwrap();
    let (channel, _stop) = serve(routes).await;
    let steps = StepStream::new(channel);
    for _ in 0..2 {
        match steps.call(confirm("ok"), String::new(), LONG).await {
            Err(Unserved(pb::step_call::Call::ConfirmOrder(confirm))) => {
                assert_eq!(confirm.order_id, "ok", "the call comes back whole")
            }
            other => panic!("expected the call back, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn a_call_its_caller_drops_leaves_nothing_waiting() {
    let (steps, server) = scripted().await;
    // The engine's own timer may end a call before the stream's deadline does.
    let dropped = tokio::time::timeout(Duration::from_millis(100), call(&steps, "hold", LONG)).await;
    assert!(dropped.is_err(), "the held call was dropped by its caller");
    assert_eq!(steps.waiting(), 0);
    call(&steps, "ok", LONG).await.expect("the stream goes on");
    assert_eq!(steps.waiting(), 0);
    assert_eq!(server.opened.load(Ordering::SeqCst), 1);
}

//! How acknowledgements leave a participant: the outbox relay publishes through [`AckRouter`],
//! which sends an acknowledgement whose request named the orchestrator's `ack_endpoint`
//! straight to it (`Orchestrator.AcknowledgeCompensations`, one call per endpoint and relay
//! batch), and publishes everything else through the compensation transport, as before.
//!
//! Such an acknowledgement is an outbox entry like any other, written in the same append as the
//! consumer-log event that decides it, with the topic and tag its request named; the endpoint
//! (and the token the orchestrator checks) are fields of the acknowledgement itself. So the
//! entry's topic and tag are always a valid route: the one taken when the endpoint does not
//! take the acknowledgement, and the one a participant of an older version (which relays the
//! entry as it is) takes after a downgrade.
//!
//! Crash windows: the relay deletes a batch only once every part of it was accepted, and the
//! orchestrator answers only after it applied each acknowledgement (or found it a duplicate),
//! so a crash on either side sends it again, which changes nothing. An endpoint that does not
//! take them (the orchestrator down, paused, recovering, moved to another address, or another
//! node there) never holds the outbox: they are published on their topic instead, which every
//! orchestrator consumes, and so are those the orchestrator answers it does not have. An
//! endpoint that failed is skipped for a while (from 1 s, doubling to 60 s), so an address that
//! no longer answers does not delay every batch by a timeout.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message as _;
use saga_messaging::MessagingError;
use saga_messaging::transport::{BoxFuture, Consumer, Handler, Outgoing, SubscriptionSpec, Transport};
use saga_proto::v1 as pb;
use saga_proto::v1::orchestrator_client::OrchestratorClient;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// Deadline of one AcknowledgeCompensations call (and of connecting); past it the acks go
/// through the topic.
const ACK_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Endpoints whose channels are kept; past it the cache is emptied (channels are re-made on
/// demand), so requests naming ever new endpoints cannot grow it without bound.
const CHANNELS_MAX: usize = 64;
/// How long an endpoint that failed is skipped, first and at most.
const SKIP_MIN: Duration = Duration::from_secs(1);
const SKIP_MAX: Duration = Duration::from_secs(60);
/// Longest endpoint taken from a request.
const ENDPOINT_LEN_MAX: usize = 256;

/// Whether a request's `ack_endpoint` is one a router can call: `http://` (or `https://` when
/// it has TLS settings, `tls`) and an authority, nothing else (no path, no whitespace or
/// control characters), that tonic accepts.
pub fn usable_endpoint(endpoint: &str, tls: bool) -> bool {
    let schemes: &[&str] = if tls { &["http", "https"] } else { &["http"] };
    endpoint.len() <= ENDPOINT_LEN_MAX
        && saga_proto::endpoint_authority(endpoint, schemes).is_some()
        && Endpoint::from_shared(endpoint.to_owned()).is_ok()
}

/// An endpoint's channel, or when it may be tried again after failing.
enum EndpointState {
    Up(Channel),
    Skipped { until: Instant, skip: Duration },
}

/// A [`Transport`] that sends acknowledgements that name an endpoint to their orchestrator and
/// publishes the rest of a batch (and what an endpoint did not take) through `inner`.
pub struct AckRouter {
    inner: Arc<dyn Transport>,
    endpoints: Mutex<HashMap<String, EndpointState>>,
    /// How `https://` endpoints are called (the orchestrator's CA, and this participant's
    /// certificate when the orchestrator asks for one); without it only `http://` ones are.
    tls: Mutex<Option<ClientTlsConfig>>,
}

impl AckRouter {
    pub fn new(inner: Arc<dyn Transport>) -> Self {
        AckRouter {
            inner,
            endpoints: Mutex::new(HashMap::new()),
            tls: Mutex::new(None),
        }
    }

    /// Calls `https://` endpoints with `tls` (channels made before are dropped).
    pub fn set_tls(&self, tls: ClientTlsConfig) {
        *self.tls.lock().expect("ack tls lock") = Some(tls);
        self.endpoints.lock().expect("ack endpoints lock").clear();
    }

    /// Whether this router can call `endpoint` (see [`usable_endpoint`]).
    pub fn usable(&self, endpoint: &str) -> bool {
        usable_endpoint(endpoint, self.tls.lock().expect("ack tls lock").is_some())
    }

    /// The channel to `endpoint`, or `None` while it is skipped after a failure.
    fn channel(&self, endpoint: &str) -> Option<Channel> {
        let mut endpoints = self.endpoints.lock().expect("ack endpoints lock");
        match endpoints.get(endpoint) {
            Some(EndpointState::Up(channel)) => return Some(channel.clone()),
            Some(EndpointState::Skipped { until, .. }) if Instant::now() < *until => return None,
            _ => {}
        }
        let mut builder = Endpoint::from_shared(endpoint.to_owned())
            .ok()?
            .connect_timeout(ACK_CALL_TIMEOUT)
            .timeout(ACK_CALL_TIMEOUT)
            .tcp_nodelay(true);
        if endpoint.starts_with("https://") {
            let tls = self.tls.lock().expect("ack tls lock").clone()?;
            builder = builder.tls_config(tls).ok()?;
        }
        let channel = builder.connect_lazy();
        if endpoints.len() >= CHANNELS_MAX && !endpoints.contains_key(endpoint) {
            endpoints.clear();
        }
        endpoints.insert(endpoint.to_owned(), EndpointState::Up(channel.clone()));
        Some(channel)
    }

    /// `endpoint` did not take a call: skip it for a while (twice as long as last time).
    fn failed(&self, endpoint: &str) {
        let mut endpoints = self.endpoints.lock().expect("ack endpoints lock");
        let skip = match endpoints.get(endpoint) {
            Some(EndpointState::Skipped { skip, .. }) => (*skip * 2).min(SKIP_MAX),
            _ => SKIP_MIN,
        };
        endpoints.insert(
            endpoint.to_owned(),
            EndpointState::Skipped {
                until: Instant::now() + skip,
                skip,
            },
        );
    }

    /// The acknowledgement in `message` and the endpoint it names, if it names one this router
    /// can call and a step the orchestrator would accept (anything else takes the topic, whose
    /// consumer logs what it cannot apply).
    fn addressed(&self, message: &Outgoing) -> Option<(String, pb::CompensationAck)> {
        let ack = pb::CompensationAck::decode(message.body.as_slice()).ok()?;
        let key = ack.key.as_ref()?;
        let named = |id: &str| saga_proto::ids::check_len(id, saga_proto::ids::ID_LEN_MAX).is_ok();
        (self.usable(&ack.ack_endpoint) && named(&key.saga_id) && named(&key.step))
            .then(|| (ack.ack_endpoint.clone(), ack))
    }

    /// Sends `acks` to `endpoint`. Ok once the orchestrator applied them, with the indices (in
    /// `acks`) of those it does not have, which go through the topic.
    async fn send(&self, endpoint: &str, acks: Vec<pb::CompensationAck>) -> Result<Vec<u32>, MessagingError> {
        let Some(channel) = self.channel(endpoint) else {
            return Err(MessagingError::Unavailable(format!(
                "{endpoint} failed recently; skipped for now"
            )));
        };
        let answer = OrchestratorClient::new(channel)
            .acknowledge_compensations(pb::AcknowledgeCompensationsRequest { acks })
            .await;
        match answer {
            Ok(answer) => Ok(answer.into_inner().not_owned),
            Err(status) => {
                self.failed(endpoint);
                Err(MessagingError::Unavailable(format!(
                    "AcknowledgeCompensations to {endpoint}: {}: {}",
                    status.code(),
                    status.message()
                )))
            }
        }
    }
}

impl Transport for AckRouter {
    fn publish<'a>(&'a self, messages: &'a [Outgoing]) -> BoxFuture<'a, Result<(), MessagingError>> {
        Box::pin(async move {
            let mut by_endpoint: HashMap<String, (Vec<&Outgoing>, Vec<pb::CompensationAck>)> = HashMap::new();
            let mut through_topic: Vec<Outgoing> = Vec::new();
            for message in messages {
                match self.addressed(message) {
                    Some((endpoint, ack)) => {
                        let (group, acks) = by_endpoint.entry(endpoint).or_default();
                        group.push(message);
                        acks.push(ack);
                    }
                    None => through_topic.push(message.clone()),
                }
            }
            for (endpoint, (group, acks)) in by_endpoint {
                match self.send(&endpoint, acks).await {
                    Ok(not_owned) => {
                        // An index the orchestrator made up names nothing: ignored.
                        through_topic.extend(
                            not_owned
                                .into_iter()
                                .filter_map(|i| group.get(i as usize).map(|m| (*m).clone())),
                        );
                    }
                    Err(error) => {
                        tracing::warn!(%error, len = group.len(), "acknowledgements go through the topic instead");
                        through_topic.extend(group.into_iter().cloned());
                    }
                }
            }
            if !through_topic.is_empty() {
                self.inner.publish(&through_topic).await?;
            }
            Ok(())
        })
    }

    fn subscribe(
        &self,
        spec: SubscriptionSpec,
        handler: Arc<dyn Handler>,
    ) -> BoxFuture<'_, Result<Box<dyn Consumer>, MessagingError>> {
        self.inner.subscribe(spec, handler)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what is published through it.
    #[derive(Default)]
    struct Recording(Mutex<Vec<Outgoing>>);

    impl Transport for Recording {
        fn publish<'a>(&'a self, messages: &'a [Outgoing]) -> BoxFuture<'a, Result<(), MessagingError>> {
            self.0.lock().expect("lock").extend(messages.iter().cloned());
            Box::pin(async { Ok(()) })
        }

        fn subscribe(
            &self,
            _spec: SubscriptionSpec,
            _handler: Arc<dyn Handler>,
        ) -> BoxFuture<'_, Result<Box<dyn Consumer>, MessagingError>> {
            Box::pin(async { Err(MessagingError::Config("not used".into())) })
        }
    }

    fn ack_message(endpoint: &str, saga_id: &str) -> Outgoing {
        Outgoing {
            topic: "ack-topic".into(),
            tag: "node-a".into(),
            key: format!("{saga_id}:reserve_stock"),
            body: pb::CompensationAck {
                key: Some(pb::StepKey {
                    saga_id: saga_id.into(),
                    step: "reserve_stock".into(),
                }),
                role: "stock".into(),
                outcome: pb::CompensationOutcome::Applied as i32,
                round: 1,
                ack_endpoint: endpoint.into(),
                ack_token: "00".into(),
                ..Default::default()
            }
            .encode_to_vec(),
            properties: vec![("k".into(), "v".into())],
        }
    }

    #[test]
    fn only_addresses_the_router_can_call_are_called() {
        for tls in [false, true] {
            assert!(usable_endpoint("http://127.0.0.1:50051", tls));
            assert!(usable_endpoint("http://orchestrator-1:50051", tls));
            assert_eq!(usable_endpoint("https://orchestrator-1:50051", tls), tls);
            for bad in [
                "",
                "127.0.0.1:50051",
                "ftp://127.0.0.1:50051",
                "http://",
                "https://",
                "http://a/b",
                "http://a\nb",
                "http://a b",
            ] {
                assert!(!usable_endpoint(bad, tls), "{bad:?}");
            }
            assert!(!usable_endpoint(&format!("http://{}", "a".repeat(300)), tls));
        }
        let router = AckRouter::new(Arc::new(Recording::default()));
        assert!(!router.usable("https://a:1"));
        router.set_tls(ClientTlsConfig::new());
        assert!(router.usable("https://a:1"));
    }

    /// An endpoint nobody listens on (an orchestrator that is down or moved) does not hold the
    /// outbox: its acks are published as they are (the topic and tag their request named), and
    /// other messages pass through; while the endpoint is skipped, no call is tried.
    #[tokio::test]
    async fn acks_an_endpoint_does_not_take_go_through_the_topic() {
        let refused = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
            listener.local_addr().expect("has an address")
            // Dropped: the port refuses connections.
        };
        let endpoint = format!("http://{refused}");
        let inner = Arc::new(Recording::default());
        let router = AckRouter::new(inner.clone());
        let plain = Outgoing {
            topic: "saga-compensation".into(),
            tag: "stock".into(),
            key: "ord-2:reserve_stock".into(),
            body: vec![1, 2, 3],
            properties: Vec::new(),
        };
        let ack = ack_message(&endpoint, "ord-1");
        router
            .publish(&[ack.clone(), plain.clone()])
            .await
            .expect("published through the topic");
        assert_eq!(inner.0.lock().expect("lock").clone(), vec![plain, ack.clone()]);
        assert!(router.channel(&endpoint).is_none(), "skipped after failing");
        let began = Instant::now();
        router
            .publish(std::slice::from_ref(&ack))
            .await
            .expect("published");
        assert!(began.elapsed() < ACK_CALL_TIMEOUT, "no call tried while skipped");
        assert_eq!(inner.0.lock().expect("lock").len(), 3);
    }

    /// An acknowledgement that names no usable endpoint is published as it is.
    #[tokio::test]
    async fn acks_without_a_usable_endpoint_are_published_as_they_are() {
        let inner = Arc::new(Recording::default());
        let router = AckRouter::new(inner.clone());
        let messages = [ack_message("", "ord-1"), ack_message("http://a/b", "ord-2")];
        router.publish(&messages).await.expect("published");
        assert_eq!(inner.0.lock().expect("lock").clone(), messages.to_vec());
    }
}

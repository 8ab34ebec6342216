//! The project's topics and consumer groups. Kept here so that scripts/dev-env (through
//! `saga-mqadmin ensure-topics`), the relay and the consumers agree on the names.

/// Compensation requests, orchestrator -> participants. Tag = participant role, key =
/// `<saga_id>:<step>`.
pub const COMPENSATION_TOPIC: &str = "saga-compensation";
/// Compensation acknowledgements, participants -> orchestrator. Key = `<saga_id>:<step>`.
pub const COMPENSATION_ACK_TOPIC: &str = "saga-compensation-ack";
/// Used by the broker smoke test only.
pub const SMOKE_TOPIC: &str = "saga-smoke";

/// Every topic scripts/dev-env creates up front.
pub const ALL_TOPICS: &[&str] = &[COMPENSATION_TOPIC, COMPENSATION_ACK_TOPIC, SMOKE_TOPIC];

/// The key of a compensation and of its acknowledgement: `<saga_id>:<step>` (a step name holds
/// no ':', so the last ':' splits it).
pub fn message_key(saga_id: &str, step: &str) -> String {
    format!("{saga_id}:{step}")
}

/// The saga id and step of a [`message_key`], if the key has that shape.
pub fn parse_message_key(key: &str) -> Option<(&str, &str)> {
    let (saga_id, step) = key.rsplit_once(':')?;
    (!saga_id.is_empty() && !step.is_empty()).then_some((saga_id, step))
}

/// The user properties of a message of ours, from its key: the W3C trace context
/// (`traceparent`) of the saga named by a [`message_key`], so that one saga stays one trace
/// through the broker for any consumer or broker tool that reads message properties
/// (`saga_proto::trace`: a saga's trace id is derived from its id). A key of another shape
/// gets none.
///
/// Derived when a message is sent rather than stored with it: the outbox stores a message's
/// topic, tag, key and body, and this is a function of the key.
pub fn message_properties(key: &str) -> Vec<(String, String)> {
    match parse_message_key(key) {
        Some((saga_id, _)) => vec![(
            saga_proto::trace::TRACEPARENT.to_owned(),
            saga_proto::trace::TraceContext::for_saga(saga_id)
                .child()
                .traceparent(),
        )],
        None => Vec::new(),
    }
}

/// The trace context a delivered message carries in its `traceparent` property, if valid.
pub fn delivery_trace(delivery: &crate::transport::Delivery) -> Option<saga_proto::trace::TraceContext> {
    delivery
        .property(saga_proto::trace::TRACEPARENT)
        .and_then(saga_proto::trace::TraceContext::parse)
}

/// Queues per topic: enough for a few consumer instances per group on one broker.
pub const QUEUES_PER_TOPIC: i32 = 8;

/// The consumer group of a participant role: one group per role, so every role receives every
/// compensation meant for it, and instances of a role share the load.
pub fn compensation_group(role: &str) -> String {
    format!("saga-compensation-{role}")
}

/// The environment variable that carries the name server address to tests and tools
/// (`host:port`); scripts/test sets it after starting the broker.
pub const NAMESRV_ENV: &str = "SAGA_ROCKETMQ_NAMESRV";

/// The name server address for tests that need the real broker: `Some` from [`NAMESRV_ENV`]
/// (set by scripts/test); `None` outside it, with a note that the test is skipped; and a panic
/// under `CI=true`, where a missing broker must fail the run rather than skip it.
pub fn namesrv_for_tests() -> Option<String> {
    match std::env::var(NAMESRV_ENV) {
        Ok(addr) => Some(addr),
        Err(_) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("{NAMESRV_ENV} is not set under CI: run the tests through scripts/test")
        }
        Err(_) => {
            eprintln!("skipped: {NAMESRV_ENV} not set (run through scripts/test)");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_of_a_saga_carries_the_saga_trace() {
        let properties = message_properties(&message_key("ord-1", "stock"));
        let [(name, value)] = properties.as_slice() else {
            panic!("one property: {properties:?}")
        };
        assert_eq!(name, saga_proto::trace::TRACEPARENT);
        let context = saga_proto::trace::TraceContext::parse(value).expect("a valid traceparent");
        assert_eq!(
            context.trace_id,
            saga_proto::trace::TraceContext::for_saga("ord-1").trace_id
        );
        assert!(message_properties("no-saga-here").is_empty());
    }
}

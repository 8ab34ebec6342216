//! `saga-mqadmin`: broker administration for scripts/dev-env.
//!
//! `saga-mqadmin ensure-topics [--namesrv 127.0.0.1:9876] [--timeout-secs 60]` creates the
//! project's topics (see `saga_messaging::topics`) and exits 0 once the name server returns a
//! route for each; exits 1 with the reason otherwise.

use std::time::Duration;

use saga_messaging::rocketmq::{RocketMqClient, RocketMqConfig};
use saga_messaging::topics;

fn usage() -> ! {
    eprintln!("usage: saga-mqadmin ensure-topics [--namesrv HOST:PORT] [--timeout-secs N]");
    std::process::exit(2);
}

fn main() {
    let mut args = std::env::args().skip(1);
    if args.next().as_deref() != Some("ensure-topics") {
        usage();
    }
    let mut namesrv = std::env::var(topics::NAMESRV_ENV).unwrap_or_else(|_| "127.0.0.1:9876".into());
    let mut timeout = Duration::from_secs(60);
    while let Some(flag) = args.next() {
        match (flag.as_str(), args.next()) {
            ("--namesrv", Some(v)) => namesrv = v,
            ("--timeout-secs", Some(v)) => {
                timeout = Duration::from_secs(v.parse().unwrap_or_else(|_| usage()))
            }
            _ => usage(),
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime builds");
    let result = runtime.block_on(async {
        let client = RocketMqClient::new(RocketMqConfig {
            thread_name: "saga-mqadmin".into(),
            ..RocketMqConfig::new(namesrv.clone())
        })?;
        let result = client
            .ensure_topics(topics::ALL_TOPICS, topics::QUEUES_PER_TOPIC, timeout)
            .await;
        client.shutdown().await;
        result
    });
    match result {
        Ok(()) => println!("topics ready on {namesrv}: {}", topics::ALL_TOPICS.join(", ")),
        Err(e) => {
            eprintln!("saga-mqadmin: {e}");
            std::process::exit(1);
        }
    }
}

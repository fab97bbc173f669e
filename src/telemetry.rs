//! Logging: JSON lines by default (`OAUTH_LOG_FORMAT=pretty` for humans), filtered by
//! `OAUTH_LOG` or `RUST_LOG` (default `info`).
//!
//! No level writes a secret: the service logs request paths (never query strings), status
//! codes, ids and error codes; sqlx logs SQL statements without their bound values; hyper,
//! reqwest and rustls log connection events, not headers or bodies (checked at `trace` by the
//! `secrets` integration test). [`ALWAYS_OFF`] keeps the one dependency target that would
//! dump raw request bytes silent whatever the filter says.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Appended to every filter. reqwest writes every byte a connection sends and receives
/// (tokens, client secrets) at `trace` under this target once a client enables
/// `connection_verbose`; this service never does, and this directive keeps it so.
pub const ALWAYS_OFF: &str = "reqwest::connect::verbose=off";

pub fn init(format: LogFormat) {
    let filter = filter_from(
        std::env::var("OAUTH_LOG").ok(),
        std::env::var("RUST_LOG").ok(),
    );
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second initialisation (tests) is harmless: the first subscriber stays.
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

/// The filter from `OAUTH_LOG`, else `RUST_LOG`, else `info` (an unparsable value falls through
/// to the next), always with [`ALWAYS_OFF`].
pub fn filter_from(oauth_log: Option<String>, rust_log: Option<String>) -> EnvFilter {
    let with_guard = |directives: String| {
        let directives = directives.trim().trim_end_matches(',').to_owned();
        if directives.is_empty() {
            return None;
        }
        EnvFilter::try_new(directives.clone()).ok()?;
        EnvFilter::try_new(format!("{directives},{ALWAYS_OFF}")).ok()
    };
    oauth_log
        .and_then(with_guard)
        .or_else(|| rust_log.and_then(with_guard))
        .unwrap_or_else(|| EnvFilter::new(format!("info,{ALWAYS_OFF}")))
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .map_err(|_| std::io::Error::other("poisoned"))?
                .extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn logged(filter: EnvFilter) -> String {
        let capture = Capture::default();
        let writer = capture.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::trace!(target: "reqwest::connect::verbose", "raw-bytes-of-a-request");
            tracing::trace!(target: "reqwest::connect", "connection-event");
            tracing::info!(target: "oauth_manager", "service-event");
        });
        let bytes = capture
            .0
            .lock()
            .map(|bytes| bytes.clone())
            .unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    #[test]
    fn trace_everywhere_still_keeps_raw_connection_bytes_out() {
        for (oauth_log, rust_log) in [
            (Some("trace"), None),
            (None, Some("trace")),
            (Some("reqwest=trace,trace"), None),
            (Some("reqwest::connect::verbose=trace"), None),
        ] {
            let log = logged(filter_from(
                oauth_log.map(str::to_owned),
                rust_log.map(str::to_owned),
            ));
            assert!(
                !log.contains("raw-bytes-of-a-request"),
                "{oauth_log:?} {rust_log:?}: {log}"
            );
            if oauth_log != Some("reqwest::connect::verbose=trace") {
                assert!(log.contains("connection-event"), "{log}");
            }
        }
    }

    #[test]
    fn the_default_is_info_and_bad_values_fall_through() {
        for (oauth_log, rust_log) in [
            (None, None),
            (Some("=not a filter=[["), None),
            (Some(""), Some("")),
        ] {
            let log = logged(filter_from(
                oauth_log.map(str::to_owned),
                rust_log.map(str::to_owned),
            ));
            assert!(log.contains("service-event"), "{log}");
            assert!(!log.contains("connection-event"), "{log}");
        }
        let log = logged(filter_from(
            Some("=[[".to_owned()),
            Some("trace".to_owned()),
        ));
        assert!(log.contains("connection-event"), "RUST_LOG applies: {log}");
    }
}

//! The webhook's own Prometheus registry (no globals): admission latency and decisions, cache
//! hits, resolutions by source, resolution errors by registry and pull grants by outcome.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdmissionLabels {
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CacheLabels {
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    registry: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    decision: String,
}

/// All metrics of one webhook process.
pub struct Metrics {
    registry: Registry,
    admission_seconds: Family<AdmissionLabels, Histogram>,
    cache: Family<CacheLabels, Counter>,
    resolutions: Family<SourceLabels, Counter>,
    resolution_seconds: Family<SourceLabels, Histogram>,
    resolution_errors: Family<ErrorLabels, Counter>,
    images: Family<DecisionLabels, Counter>,
    grants: Family<OutcomeLabels, Counter>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ]
    .into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("speculum_webhook");
        let admission_seconds = Family::<AdmissionLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        let resolution_seconds = Family::<SourceLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(latency_buckets())
        });
        let cache = Family::default();
        let resolutions = Family::default();
        let resolution_errors = Family::default();
        let images = Family::default();
        let grants = Family::default();
        registry.register(
            "admission_duration_seconds",
            "Time to answer one AdmissionReview",
            admission_seconds.clone(),
        );
        registry.register(
            "cache_lookups",
            "Resolution cache lookups by result",
            cache.clone(),
        );
        registry.register(
            "resolutions",
            "Successful resolutions by source",
            resolutions.clone(),
        );
        registry.register(
            "resolution_duration_seconds",
            "Time to resolve one reference upstream or in the cluster",
            resolution_seconds.clone(),
        );
        registry.register(
            "resolution_errors",
            "Failed resolutions by registry and reason",
            resolution_errors.clone(),
        );
        registry.register(
            "images",
            "Images seen in admitted objects, by decision",
            images.clone(),
        );
        registry.register(
            "grants_signed",
            "Pull-grant decisions for images of new Pods, by outcome (signed, public, anonymous, duplicate, policy_error, sign_error)",
            grants.clone(),
        );
        Metrics {
            registry,
            admission_seconds,
            cache,
            resolutions,
            resolution_seconds,
            resolution_errors,
            images,
            grants,
        }
    }

    pub fn admission(&self, kind: &str, outcome: &str, elapsed: Duration) {
        self.admission_seconds
            .get_or_create(&AdmissionLabels {
                kind: kind.to_owned(),
                outcome: outcome.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    pub fn cache_lookup(&self, hit: bool) {
        self.cache
            .get_or_create(&CacheLabels {
                result: if hit { "hit" } else { "miss" }.to_owned(),
            })
            .inc();
    }

    /// One resolution by `source` (`resolve::Source::as_str`: the label is a string here, so
    /// the metrics never import the resolver that records into them).
    pub fn resolved(&self, source: &'static str, _registry: &str, elapsed: Duration) {
        let l = SourceLabels {
            source: source.to_owned(),
        };
        self.resolutions.get_or_create(&l).inc();
        self.resolution_seconds
            .get_or_create(&l)
            .observe(elapsed.as_secs_f64());
    }

    pub fn resolution_error(&self, registry: &str, reason: &str) {
        self.resolution_errors
            .get_or_create(&ErrorLabels {
                registry: registry.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn image(&self, decision: &str) {
        self.images
            .get_or_create(&DecisionLabels {
                decision: decision.to_owned(),
            })
            .inc();
    }

    pub fn grant(&self, outcome: &str) {
        self.grants
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

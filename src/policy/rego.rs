//! `RegoPolicy`: a Rego v1 bundle evaluated with regorus.
//!
//! A bundle is a directory laid out like an OPA bundle: `*.rego` modules anywhere below it,
//! `data.json` / `data.yaml` files whose directory path is their place under `data`, and an
//! optional `.manifest` (only its `revision` is read, for logs). Entries whose names start with
//! `.` are skipped, which is what makes a mounted ConfigMap work: its files are symlinks into a
//! hidden `..data` directory that must not be loaded twice. `*_test.rego` modules are loaded
//! only by [`run_tests`].
//!
//! The bundle is parsed and compiled once; each decision runs on a clone of the compiled engine
//! (regorus evaluation needs `&mut`; a clone is a few reference-count bumps) under an execution
//! time limit.

use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use regorus::utils::limits::ExecutionTimerConfig;
use regorus::{Engine, Value};

use super::{Decision, Input, Policy, PolicyError};

/// The rule every bundle must define (see `docs/policy.md`).
pub(crate) const ENTRYPOINT: &str = "data.speculum.mirror.decision";

/// The files of one bundle, read from disk.
#[derive(Debug, Clone, Default)]
pub struct Bundle {
    pub dir: PathBuf,
    /// `(path relative to the bundle, text)` of the policy modules.
    pub modules: Vec<(String, String)>,
    /// `(path relative to the bundle, text)` of the `*_test.rego` modules.
    pub tests: Vec<(String, String)>,
    /// `(data path components, JSON value)` of each data file.
    pub data: Vec<(Vec<String>, serde_json::Value)>,
    pub revision: Option<String>,
}

impl Bundle {
    /// Reads every bundle file below `dir`.
    pub fn read(dir: &Path) -> Result<Bundle, PolicyError> {
        let mut bundle = Bundle {
            dir: dir.to_owned(),
            ..Bundle::default()
        };
        walk(dir, dir, &mut bundle, 0)?;
        let manifest = dir.join(".manifest");
        if manifest.is_file() {
            let text = read(&manifest)?;
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| PolicyError::Load {
                    path: manifest.display().to_string(),
                    message: e.to_string(),
                })?;
            bundle.revision = value
                .get("revision")
                .and_then(|r| r.as_str())
                .map(str::to_owned);
        }
        if bundle.modules.is_empty() {
            return Err(PolicyError::Empty(dir.display().to_string()));
        }
        // A stable order: the fingerprint and error messages must not depend on readdir order.
        bundle.modules.sort();
        bundle.tests.sort();
        bundle.data.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(bundle)
    }

    /// A digest of every file, to notice a changed bundle.
    pub fn fingerprint(&self) -> String {
        use sha2::{Digest as _, Sha256};
        let mut h = Sha256::new();
        for (path, text) in self.modules.iter().chain(&self.tests) {
            h.update(path.as_bytes());
            h.update([0]);
            h.update(text.as_bytes());
            h.update([0]);
        }
        for (path, value) in &self.data {
            h.update(path.join("/").as_bytes());
            h.update([0]);
            h.update(value.to_string().as_bytes());
            h.update([0]);
        }
        hex::encode(h.finalize())
    }

    fn name(&self) -> String {
        let base = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| self.dir.display().to_string());
        match &self.revision {
            Some(r) => format!("{base}@{r}"),
            None => base,
        }
    }

    /// An engine with the data and the given modules loaded (Rego v1).
    fn engine(&self, with_tests: bool) -> Result<Engine, PolicyError> {
        let mut engine = Engine::new();
        engine.set_rego_v0(false);
        engine.set_strict_builtin_errors(true);
        for (path, value) in &self.data {
            let mut nested = value.clone();
            for key in path.iter().rev() {
                let mut map = serde_json::Map::new();
                map.insert(key.clone(), nested);
                nested = serde_json::Value::Object(map);
            }
            let v = Value::from_json_str(&nested.to_string()).map_err(|e| PolicyError::Load {
                path: path.join("/"),
                message: e.to_string(),
            })?;
            engine.add_data(v).map_err(|e| PolicyError::Load {
                path: format!("data {}", path.join("/")),
                message: e.to_string(),
            })?;
        }
        let tests: &[(String, String)] = if with_tests { &self.tests } else { &[] };
        for (path, text) in self.modules.iter().chain(tests) {
            engine
                .add_policy(path.clone(), text.clone())
                .map_err(|e| PolicyError::Load {
                    path: path.clone(),
                    message: e.to_string(),
                })?;
        }
        Ok(engine)
    }
}

fn read(path: &Path) -> Result<String, PolicyError> {
    std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn walk(root: &Path, dir: &Path, bundle: &mut Bundle, depth: usize) -> Result<(), PolicyError> {
    if depth > 16 {
        return Err(PolicyError::Load {
            path: dir.display().to_string(),
            message: "directories nested too deep".to_owned(),
        });
    }
    let entries = std::fs::read_dir(dir).map_err(|source| PolicyError::Read {
        path: dir.display().to_string(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| PolicyError::Read {
            path: dir.display().to_string(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // Follows symlinks: ConfigMap files are links into `..data/`.
        if path.is_dir() {
            walk(root, &path, bundle, depth + 1)?;
            continue;
        }
        let rel = path
            .strip_prefix(root)
            .unwrap_or(&path)
            .to_string_lossy()
            .into_owned();
        let parents = || -> Vec<String> {
            Path::new(&rel)
                .parent()
                .map(|p| {
                    p.components()
                        .map(|c| c.as_os_str().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default()
        };
        if name.ends_with("_test.rego") {
            bundle.tests.push((rel.clone(), read(&path)?));
        } else if name.ends_with(".rego") {
            bundle.modules.push((rel.clone(), read(&path)?));
        } else if name == "data.json" {
            let value = serde_json::from_str(&read(&path)?).map_err(|e| PolicyError::Load {
                path: rel.clone(),
                message: e.to_string(),
            })?;
            bundle.data.push((parents(), value));
        } else if name == "data.yaml" || name == "data.yml" {
            let value = yaml_serde::from_str(&read(&path)?).map_err(|e| PolicyError::Load {
                path: rel.clone(),
                message: e.to_string(),
            })?;
            bundle.data.push((parents(), value));
        }
    }
    Ok(())
}

/// How many decisions are remembered per compiled bundle (the cache is cleared when full).
const CACHE_MAX: usize = 4096;
/// How long a remembered decision is reused: short enough that a policy reading the clock
/// (`time.now_ns()`) is re-evaluated soon, long enough to cover the repeats of one pull
/// (HEAD then GET of a tag, every node asking for the same blob, the advertiser's reconciles).
const CACHE_TTL: Duration = Duration::from_secs(10);

type Cache = std::collections::HashMap<String, (std::time::Instant, Decision)>;

/// A compiled bundle, ready to decide. Decisions are cached by their exact input (a reload
/// compiles a new `RegoPolicy`, so a new bundle never sees the old cache).
#[derive(Clone)]
pub struct RegoPolicy {
    engine: Engine,
    name: String,
    fingerprint: String,
    // A std Mutex: held for one map lookup or insert, never across an `.await`.
    cache: std::sync::Arc<std::sync::Mutex<Cache>>,
}

impl RegoPolicy {
    /// Compiles `bundle` and checks that the entrypoint exists. Each evaluation may take at
    /// most `timeout`.
    pub fn compile(bundle: &Bundle, timeout: Duration) -> Result<RegoPolicy, PolicyError> {
        let mut engine = bundle.engine(false)?;
        engine.set_execution_timer_config(ExecutionTimerConfig {
            limit: timeout,
            // Check the clock every few work units: cheap, and a runaway comprehension is
            // stopped within microseconds of the limit.
            check_interval: NonZeroU32::MIN.saturating_add(15),
        });
        // Evaluate once with an empty input, on the engine that is kept: a bundle without the
        // entrypoint, or with one that fails on every input, is refused now rather than at the
        // first request — and the engine is left *prepared* (rule analysis and scheduling done),
        // so the clone each decision runs on skips that work on every decision.
        engine.set_input(Value::new_object());
        engine
            .eval_rule(ENTRYPOINT.to_owned())
            .map_err(|e| PolicyError::Load {
                path: bundle.dir.display().to_string(),
                message: format!("evaluating {ENTRYPOINT}: {e}"),
            })?;
        Ok(RegoPolicy {
            engine,
            name: bundle.name(),
            fingerprint: bundle.fingerprint(),
            cache: Default::default(),
        })
    }

    /// Reads and compiles the bundle in `dir`.
    pub fn load(dir: &Path, timeout: Duration) -> Result<RegoPolicy, PolicyError> {
        RegoPolicy::compile(&Bundle::read(dir)?, timeout)
    }

    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }
}

impl RegoPolicy {
    /// Evaluates without the cache.
    pub fn evaluate(&self, input: &Input) -> Result<Decision, PolicyError> {
        let json = serde_json::to_string(input).map_err(|e| PolicyError::Eval(e.to_string()))?;
        self.evaluate_json(&json)
    }

    fn evaluate_json(&self, json: &str) -> Result<Decision, PolicyError> {
        let mut engine = self.engine.clone();
        let value = Value::from_json_str(json).map_err(|e| PolicyError::Eval(e.to_string()))?;
        engine.set_input(value);
        let out = engine.eval_rule(ENTRYPOINT.to_owned()).map_err(|e| {
            let text = e.to_string();
            if text.contains("time limit") {
                PolicyError::Timeout
            } else {
                PolicyError::Eval(text)
            }
        })?;
        if out == Value::Undefined {
            return Err(PolicyError::Undefined);
        }
        let json = serde_json::to_value(&out).map_err(|e| PolicyError::Output(e.to_string()))?;
        serde_json::from_value(json).map_err(|e| PolicyError::Output(e.to_string()))
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, Cache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Policy for RegoPolicy {
    fn decide(&self, input: &Input) -> Result<Decision, PolicyError> {
        let json = serde_json::to_string(input).map_err(|e| PolicyError::Eval(e.to_string()))?;
        if let Some((at, d)) = self.cache().get(&json)
            && at.elapsed() < CACHE_TTL
        {
            return Ok(d.clone());
        }
        // Errors are not remembered: a timeout on a busy machine must not stick.
        let decision = self.evaluate_json(&json)?;
        let mut cache = self.cache();
        if cache.len() >= CACHE_MAX {
            cache.clear();
        }
        cache.insert(json, (std::time::Instant::now(), decision.clone()));
        Ok(decision)
    }

    fn describe(&self) -> String {
        format!(
            "bundle {} ({})",
            self.name,
            &self.fingerprint[..12.min(self.fingerprint.len())]
        )
    }
}

/// The outcome of one `test_*` rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestResult {
    /// `data.<package>.<rule>`.
    pub name: String,
    pub passed: bool,
    /// Why it failed (an error, or the value it produced).
    pub detail: String,
}

/// Runs every `test_*` rule of the bundle's `*_test.rego` modules, as `opa test` does: a test
/// passes when its rule is `true`.
pub fn run_tests(bundle: &Bundle, timeout: Duration) -> Result<Vec<TestResult>, PolicyError> {
    let mut engine = bundle.engine(true)?;
    engine.set_execution_timer_config(ExecutionTimerConfig {
        limit: timeout,
        check_interval: NonZeroU32::MIN.saturating_add(15),
    });
    let mut results = Vec::new();
    for (_, text) in &bundle.tests {
        let Some(package) = text.lines().find_map(|l| l.trim().strip_prefix("package ")) else {
            continue;
        };
        let package = package.trim();
        let mut seen = std::collections::BTreeSet::new();
        for line in text.lines() {
            // Test rules start at column 0: `test_x if {`, `test_x := …`.
            let Some(rest) = line.strip_prefix("test_") else {
                continue;
            };
            let ident: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            let rule = format!("test_{ident}");
            if !seen.insert(rule.clone()) {
                continue;
            }
            let name = format!("data.{package}.{rule}");
            let mut e = engine.clone();
            let (passed, detail) = match e.eval_rule(name.clone()) {
                Ok(Value::Bool(true)) => (true, String::new()),
                Ok(Value::Undefined) => (false, "undefined (a condition did not hold)".to_owned()),
                Ok(other) => (false, format!("produced {other}")),
                Err(err) => (false, format!("error: {err}")),
            };
            results.push(TestResult {
                name,
                passed,
                detail,
            });
        }
    }
    Ok(results)
}

/// Reads, tests and compiles a bundle: what a (re)load does. The tests must exist and pass.
pub fn load_tested(dir: &Path, timeout: Duration) -> Result<RegoPolicy, PolicyError> {
    let bundle = Bundle::read(dir)?;
    // Tests get a generous limit: they may evaluate many decisions each.
    let results = run_tests(&bundle, timeout.max(Duration::from_secs(2)))?;
    let failed: Vec<String> = results
        .iter()
        .filter(|r| !r.passed)
        .map(|r| format!("{} ({})", r.name, r.detail))
        .collect();
    if !failed.is_empty() {
        return Err(PolicyError::TestsFailed(failed.join(", ")));
    }
    RegoPolicy::compile(&bundle, timeout)
}

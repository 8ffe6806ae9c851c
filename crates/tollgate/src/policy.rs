//! Policies: which quotas apply to a request, and what to do when the store fails.

use crate::Quota;

/// A named set of quotas applied to some requests.
///
/// The name labels the policy's metrics and names it in the `RateLimit` headers, so keep it
/// short and stable (`"login"`, `"api"`). A request passes only when every quota of its policy
/// allows it.
///
/// ```
/// use tollgate::{FailureMode, Policy, Quota};
///
/// # fn main() -> Result<(), tollgate::QuotaError> {
/// // 3 per minute per client; refuse (503) rather than let logins through unchecked when the
/// // store is down.
/// let login = Policy::new("login", Quota::per_minute(3)?).failure_mode(FailureMode::Closed);
///
/// // A burst limit and a sustained one, decided together.
/// let export = Policy::new("export", Quota::per_second(2)?).add_quota(Quota::per_minute(20)?);
/// assert_eq!(export.quotas().len(), 2);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct Policy {
    pub(crate) name: String,
    pub(crate) quotas: Vec<Quota>,
    pub(crate) failure: FailureMode,
    pub(crate) scope: KeyScope,
    pub(crate) cost: u32,
}

impl Policy {
    /// A policy with one quota, failing open, keyed per route, costing 1 unit per request.
    pub fn new(name: impl Into<String>, quota: Quota) -> Self {
        Policy {
            name: name.into(),
            quotas: vec![quota],
            failure: FailureMode::Open,
            scope: KeyScope::Route,
            cost: 1,
        }
    }

    /// Adds another quota, decided together with the others in one store call.
    pub fn add_quota(mut self, quota: Quota) -> Self {
        self.quotas.push(quota);
        self
    }

    /// What to do when the store cannot decide (default: [`FailureMode::Open`]).
    pub fn failure_mode(mut self, failure: FailureMode) -> Self {
        self.failure = failure;
        self
    }

    /// What the route part of the key is (default: [`KeyScope::Route`]).
    pub fn scope(mut self, scope: KeyScope) -> Self {
        self.scope = scope;
        self
    }

    /// How many units each request spends (default 1). A cost above the smallest burst can
    /// never pass: such requests are answered 413 and logged as an error.
    pub fn cost(mut self, cost: u32) -> Self {
        self.cost = cost;
        self
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The policy's quotas.
    pub fn quotas(&self) -> &[Quota] {
        &self.quotas
    }

    /// The policy's failure mode.
    pub fn failure(&self) -> FailureMode {
        self.failure
    }
}

/// What to do with a request when the store cannot decide (down, slow, broken).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum FailureMode {
    /// Let the request through, count it in `ratelimit_fail_open_total{policy,reason}` and log a
    /// warning with the marker `rate-limit-degraded`. The default: a broken limiter should not
    /// take the service down with it.
    #[default]
    Open,
    /// Answer 503 Service Unavailable with a `Retry-After`, without calling the service; counted
    /// in `ratelimit_fail_closed_total`. For endpoints where an unlimited client is worse than a
    /// refused one (login, password reset, expensive exports).
    Closed,
}

/// What the route part of a policy's keys is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum KeyScope {
    /// The matched route template (`/users/{id}`): each route the policy applies to has its own
    /// budget per client. Without a matched path (plain tower), the policy name.
    #[default]
    Route,
    /// The policy name: every route under the policy shares one budget per client.
    Policy,
}

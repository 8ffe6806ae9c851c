//! Policies: which quotas apply to a request, what a request costs, who is exempt, and what to
//! do when the store fails.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use http::{Extensions, HeaderMap, Method, Request, Uri};
use ipnet::IpNet;

use crate::Quota;

/// The one view of a request that key extractors, cost functions and allowlist predicates
/// see: its method, URI, headers and extensions, the client address the layer resolved (with
/// its trusted proxies, see [`ClientIpSource`](crate::ClientIpSource)) and the route template axum matched.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    extensions: &'a Extensions,
    client_ip: Option<IpAddr>,
    route: Option<&'a str>,
}

impl<'a> RequestParts<'a> {
    /// The parts of `req`, without a client address or matched route (the layers fill both in;
    /// tests of a closure can set them).
    pub fn new<B>(req: &'a Request<B>) -> Self {
        RequestParts {
            method: req.method(),
            uri: req.uri(),
            headers: req.headers(),
            extensions: req.extensions(),
            client_ip: None,
            route: None,
        }
    }

    /// Sets the client address.
    #[must_use]
    pub fn with_client_ip(mut self, ip: Option<IpAddr>) -> Self {
        self.client_ip = ip;
        self
    }

    /// Sets the matched route template.
    #[must_use]
    pub fn with_route(mut self, route: Option<&'a str>) -> Self {
        self.route = route;
        self
    }

    /// The method.
    pub fn method(&self) -> &'a Method {
        self.method
    }

    /// The URI (path and query as the client sent them).
    pub fn uri(&self) -> &'a Uri {
        self.uri
    }

    /// The headers.
    pub fn headers(&self) -> &'a HeaderMap {
        self.headers
    }

    /// The extensions (what earlier layers put there).
    pub fn extensions(&self) -> &'a Extensions {
        self.extensions
    }

    /// The client address, resolved through the layer's trusted proxies and not masked;
    /// `None` when the server gave no peer address.
    pub fn client_ip(&self) -> Option<IpAddr> {
        self.client_ip
    }

    /// The route template axum matched (`/users/{id}`), if any.
    pub fn route(&self) -> Option<&'a str> {
        self.route
    }
}

type CostFn = dyn Fn(&RequestParts<'_>) -> u32 + Send + Sync;
type Predicate = dyn Fn(&RequestParts<'_>) -> bool + Send + Sync;

/// How many units a request spends.
#[derive(Clone)]
pub(crate) enum Cost {
    Fixed(u32),
    Fn(Arc<CostFn>),
}

impl Cost {
    /// The cost of a request: at least 1, whatever a cost function says, since a request that
    /// costs nothing is never refused.
    pub(crate) fn of(&self, parts: &RequestParts<'_>) -> u32 {
        match self {
            Cost::Fixed(n) => *n,
            Cost::Fn(f) => f(parts).max(1),
        }
    }
}

impl PartialEq for Cost {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Cost::Fixed(a), Cost::Fixed(b)) => a == b,
            (Cost::Fn(a), Cost::Fn(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

impl fmt::Debug for Cost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Cost::Fixed(n) => write!(f, "{n}"),
            Cost::Fn(_) => f.write_str("<fn>"),
        }
    }
}

/// Requests a policy never limits: client address ranges, user ids, or a predicate.
///
/// Allowlisted requests skip the store entirely (no round trip) and are counted in
/// `ratelimit_requests_total{decision="allowlisted"}`. Addresses are matched on the client
/// address before any IPv6 prefix masking; users on the value the user extractor returned.
///
/// ```
/// use tollgate::Allowlist;
///
/// let office = Allowlist::new()
///     .cidr("192.0.2.0/24".parse().unwrap())
///     .user("healthcheck")
///     .predicate(|req| req.headers().contains_key("x-internal-job"));
/// # let _ = office;
/// ```
#[derive(Clone, Default)]
#[must_use]
pub struct Allowlist {
    cidrs: Vec<IpNet>,
    users: HashSet<String>,
    predicate: Option<Arc<Predicate>>,
}

impl Allowlist {
    /// An empty allowlist.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an address range.
    pub fn cidr(mut self, net: IpNet) -> Self {
        self.cidrs.push(net.trunc());
        self
    }

    /// Adds address ranges.
    pub fn cidrs(mut self, nets: impl IntoIterator<Item = IpNet>) -> Self {
        self.cidrs.extend(nets.into_iter().map(|n| n.trunc()));
        self
    }

    /// Adds a user id (as the user extractor returns it).
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.users.insert(user.into());
        self
    }

    /// Adds user ids.
    pub fn users(mut self, users: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.users.extend(users.into_iter().map(Into::into));
        self
    }

    /// Allowlists the requests for which `f` returns true (replaces an earlier predicate).
    pub fn predicate<F>(mut self, f: F) -> Self
    where
        F: Fn(&RequestParts<'_>) -> bool + Send + Sync + 'static,
    {
        self.predicate = Some(Arc::new(f));
        self
    }

    /// Adds everything `other` holds (its predicate, if any, is tried after this one's).
    pub fn merge(mut self, other: &Allowlist) -> Self {
        self.cidrs.extend(other.cidrs.iter().copied());
        self.users.extend(other.users.iter().cloned());
        self.predicate = match (self.predicate.take(), other.predicate.clone()) {
            (Some(a), Some(b)) => Some(Arc::new(move |r: &RequestParts<'_>| a(r) || b(r))),
            (a, b) => a.or(b),
        };
        self
    }

    /// Whether nothing is allowlisted.
    pub fn is_empty(&self) -> bool {
        self.cidrs.is_empty() && self.users.is_empty() && self.predicate.is_none()
    }

    /// Whether this request is allowlisted.
    pub fn matches(
        &self,
        ip: Option<IpAddr>,
        user: Option<&str>,
        parts: &RequestParts<'_>,
    ) -> bool {
        ip.is_some_and(|ip| {
            let ip = ip.to_canonical();
            self.cidrs.iter().any(|n| n.contains(&ip))
        }) || user.is_some_and(|u| self.users.contains(u))
            || self.predicate.as_ref().is_some_and(|p| p(parts))
    }
}

impl PartialEq for Allowlist {
    fn eq(&self, other: &Self) -> bool {
        self.cidrs == other.cidrs
            && self.users == other.users
            && match (&self.predicate, &other.predicate) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}

impl fmt::Debug for Allowlist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Allowlist")
            .field("cidrs", &self.cidrs)
            .field("users", &self.users.len())
            .field("predicate", &self.predicate.is_some())
            .finish()
    }
}

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
/// let login = Policy::new("login", Quota::per_minute(3)?).with_failure_mode(FailureMode::Closed);
///
/// // A burst limit and a sustained one, decided together.
/// let export = Policy::new("export", Quota::per_second(2)?).add_quota(Quota::per_minute(20)?);
/// assert_eq!(export.quotas().len(), 2);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq)]
#[must_use]
pub struct Policy {
    pub(crate) name: String,
    pub(crate) quotas: Vec<Quota>,
    pub(crate) failure: FailureMode,
    pub(crate) scope: KeyScope,
    pub(crate) cost: Cost,
    pub(crate) shadow: bool,
    pub(crate) allowlist: Allowlist,
}

impl Policy {
    /// A policy with one quota, failing open, keyed per route, costing 1 unit per request.
    pub fn new(name: impl Into<String>, quota: Quota) -> Self {
        Policy {
            name: name.into(),
            quotas: vec![quota],
            failure: FailureMode::Open,
            scope: KeyScope::Route,
            cost: Cost::Fixed(1),
            shadow: false,
            allowlist: Allowlist::new(),
        }
    }

    /// Adds another quota, decided together with the others in one store call.
    pub fn add_quota(mut self, quota: Quota) -> Self {
        self.quotas.push(quota);
        self
    }

    /// What to do when the store cannot decide (default: [`FailureMode::Open`]).
    pub fn with_failure_mode(mut self, failure: FailureMode) -> Self {
        self.failure = failure;
        self
    }

    /// What the route part of the key is (default: [`KeyScope::Route`]).
    pub fn with_scope(mut self, scope: KeyScope) -> Self {
        self.scope = scope;
        self
    }

    /// How many units each request spends (default 1): at least 1 and at most the smallest
    /// burst of the policy's quotas, which the layer checks when the policy is added (a cost of
    /// 0 would never be refused; one above the burst could never pass).
    pub fn with_cost(mut self, cost: u32) -> Self {
        self.cost = Cost::Fixed(cost);
        self
    }

    /// Computes each request's cost from the request, for example by endpoint weight or by the
    /// size class a query asks for.
    ///
    /// Whatever a client controls here, it controls the cost: clamp the value to a range that
    /// makes sense for the endpoint. A result of 0 is raised to 1 (a free request is never
    /// refused); a result above the smallest burst can never pass and is answered 413.
    ///
    /// ```
    /// use tollgate::{Policy, Quota};
    ///
    /// # fn main() -> Result<(), tollgate::QuotaError> {
    /// // A page of up to 1000 rows costs 1 unit per 100 rows.
    /// let search = Policy::new("search", Quota::per_minute(100)?).with_cost_fn(|req| {
    ///     let rows = req.uri().query()
    ///         .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("limit=")))
    ///         .and_then(|v| v.parse::<u32>().ok())
    ///         .unwrap_or(100)
    ///         .min(1000);
    ///     rows.div_ceil(100).max(1)
    /// });
    /// # let _ = search; Ok(()) }
    /// ```
    pub fn with_cost_fn<F>(mut self, f: F) -> Self
    where
        F: Fn(&RequestParts<'_>) -> u32 + Send + Sync + 'static,
    {
        self.cost = Cost::Fn(Arc::new(f));
        self
    }

    /// Shadow mode: decide and count as usual, but never refuse. Requests that would have been
    /// refused are let through, counted in `ratelimit_requests_total{decision="shadow_limited"}`
    /// and logged (`rate-limit-shadow`), and no rate-limit headers are sent. For rolling out a
    /// new limit safely.
    pub fn with_shadow(mut self, shadow: bool) -> Self {
        self.shadow = shadow;
        self
    }

    /// Requests this policy never limits (added to any allowlist of the layer).
    pub fn with_allowlist(mut self, allowlist: Allowlist) -> Self {
        self.allowlist = allowlist;
        self
    }

    /// The policy's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Checks the policy on its own: a name that can label metrics and headers, and a fixed
    /// cost that can pass and be refused. The layer and the configuration file both run this
    /// (and the checks across policies) when a policy is added.
    ///
    /// # Errors
    ///
    /// [`PolicyError::Name`] or [`PolicyError::Cost`].
    pub fn validate(&self) -> Result<(), PolicyError> {
        check_name(&self.name)?;
        if let Cost::Fixed(cost) = self.cost {
            let min_burst = self
                .quotas
                .iter()
                .map(Quota::burst)
                .min()
                .unwrap_or(u32::MAX);
            if cost == 0 || cost > min_burst {
                return Err(PolicyError::Cost {
                    policy: self.name.clone(),
                    cost,
                    min_burst,
                });
            }
        }
        Ok(())
    }

    /// The policy's quotas.
    pub fn quotas(&self) -> &[Quota] {
        &self.quotas
    }

    /// The policy's failure mode.
    pub fn failure_mode(&self) -> FailureMode {
        self.failure
    }

    /// Whether the policy is in shadow mode.
    pub fn is_shadow(&self) -> bool {
        self.shadow
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

/// Why a policy cannot be used as given.
///
/// The layers check every policy when it is added and panic with this message (a
/// misconfiguration is a programmer error, found at start-up, as axum does for conflicting
/// routes); the configuration file reports the same checks as errors that name the field.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PolicyError {
    /// The name is not 1 to 64 letters, digits, `-` or `_` (it labels metrics and headers).
    Name {
        /// The name.
        name: String,
    },
    /// The route template does not start with `/`.
    Route {
        /// The policy.
        policy: String,
        /// The template.
        route: String,
    },
    /// The fixed cost is 0 (never refused) or above the smallest burst (never allowed).
    Cost {
        /// The policy.
        policy: String,
        /// The cost.
        cost: u32,
        /// The smallest burst of its quotas.
        min_burst: u32,
    },
    /// Another, different policy already has this name. The name is a policy's namespace in
    /// the store and its label in the metrics: two different policies with one name would
    /// share the state of every quota they have in common, and merge their counts.
    NameTaken {
        /// The name.
        name: String,
    },
    /// Another policy already applies to this route and method.
    Bound {
        /// The policy being added.
        policy: String,
        /// The route template.
        route: String,
        /// The method, or any.
        method: Option<Method>,
    },
}

impl fmt::Display for PolicyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyError::Name { name } => write!(
                f,
                "invalid policy name {name:?}: use 1 to 64 letters, digits, '-' or '_'"
            ),
            PolicyError::Route { policy, route } => write!(
                f,
                "policy {policy:?}: route {route:?} is not a route template (it starts with '/')"
            ),
            PolicyError::Cost {
                policy,
                cost,
                min_burst,
            } => write!(
                f,
                "policy {policy:?}: cost {cost} must be between 1 and the smallest burst \
                 ({min_burst}), or no request could pass (or none be refused)"
            ),
            PolicyError::NameTaken { name } => write!(
                f,
                "policy name {name:?} is already used by a different policy; two policies with \
                 one name would share the state of the quotas they have in common and merge \
                 their metrics (apply the same policy to several routes, or give each its own \
                 name)"
            ),
            PolicyError::Bound {
                policy,
                route,
                method,
            } => write!(
                f,
                "policy {policy:?}: another policy already applies to {} {route}",
                method.as_ref().map_or("any method on", Method::as_str)
            ),
        }
    }
}

impl std::error::Error for PolicyError {}

/// A policy name: 1 to 64 letters, digits, `-` or `_`.
pub(crate) fn check_name(name: &str) -> Result<(), PolicyError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(PolicyError::Name {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// The checks across the policies of one layer, for a policy `new` about to be bound to
/// `route` and `method` (`route` is `None` for the default policy): its route is a template,
/// no other policy is bound there, and no different policy has its name.
pub(crate) fn check_binding<P: PartialEq>(
    existing: &[(Option<Method>, String, P)],
    default: Option<&P>,
    name_of: impl Fn(&P) -> &str,
    method: Option<&Method>,
    route: Option<&str>,
    new: &P,
) -> Result<(), PolicyError> {
    let name = name_of(new);
    if let Some(route) = route {
        if !route.starts_with('/') {
            return Err(PolicyError::Route {
                policy: name.to_owned(),
                route: route.to_owned(),
            });
        }
        if existing
            .iter()
            .any(|(m, r, _)| r == route && m.as_ref() == method)
        {
            return Err(PolicyError::Bound {
                policy: name.to_owned(),
                route: route.to_owned(),
                method: method.cloned(),
            });
        }
    }
    let others = existing.iter().map(|(_, _, p)| p).chain(default);
    for other in others {
        if name_of(other) == name && other != new {
            return Err(PolicyError::NameTaken {
                name: name.to_owned(),
            });
        }
    }
    Ok(())
}

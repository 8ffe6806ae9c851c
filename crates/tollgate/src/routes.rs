//! The table both layers use to find the policy of a request: by axum's matched route template
//! and method, else a default policy.

use std::collections::HashMap;
use std::sync::Arc;

use http::{Method, Request};

use crate::key::prefix_hash;

/// Policies by route template, each for any method or for one method, and a default.
pub(crate) struct RouteTable<P> {
    // Matched against axum's `MatchedPath`; without axum only the default applies. Looked up
    // on every request, by a template (never a client's raw path): ahash, seeded, where std's
    // SipHash cost about twice as much per lookup.
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    routes: HashMap<String, Entry<P>, ahash::RandomState>,
    default: Option<Bound<P>>,
}

/// A policy, with the key prefixes ([`prefix_hash`]) of its keys hashed once, when the table
/// is built: keyed by its name, and by its name and the route template it was found under.
pub(crate) struct Bound<P> {
    pub(crate) policy: Arc<P>,
    /// `prefix_hash(name, name)`.
    pub(crate) name_prefix: u64,
    /// `prefix_hash(name, template)`: `None` for the default policy found under a template the
    /// table has no entry for (then it is hashed per request).
    pub(crate) route_prefix: Option<u64>,
}

impl<P> Bound<P> {
    fn new(policy: Arc<P>, name: &str, template: Option<&str>) -> Self {
        Bound {
            name_prefix: prefix_hash(name, name),
            route_prefix: template.map(|t| prefix_hash(name, t)),
            policy,
        }
    }
}

struct Entry<P> {
    any: Option<Bound<P>>,
    by_method: Vec<(Method, Bound<P>)>,
    /// The default policy under this template (`None` without a default).
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    default: Option<Bound<P>>,
}

impl<P> Entry<P> {
    /// The policy bound to this method. A `HEAD` request without a `HEAD` entry takes the
    /// `GET` entry: axum answers `HEAD` with the `GET` handler (dropping only the body), so a
    /// `GET` policy that did not cover `HEAD` could be stepped around with `curl -I`.
    #[cfg_attr(not(feature = "axum"), allow(dead_code))]
    fn for_method(&self, method: &Method) -> Option<&Bound<P>> {
        let find = |m: &Method| self.by_method.iter().find(|(e, _)| e == m).map(|(_, p)| p);
        find(method).or_else(|| {
            (*method == Method::HEAD)
                .then(|| find(&Method::GET))
                .flatten()
        })
    }
}

impl<P> RouteTable<P> {
    /// Builds the table from a layer's entries, compiling each policy with `compile` (`name`
    /// gives a compiled policy's name). The last entry for the same route and method wins, as
    /// with a router.
    pub(crate) fn build<S>(
        entries: &[(Option<Method>, String, S)],
        default: Option<&S>,
        mut compile: impl FnMut(&S) -> Arc<P>,
        name: impl Fn(&P) -> &str,
    ) -> Self {
        let default = default.map(&mut compile);
        let bind = |policy: &Arc<P>, template: Option<&str>| {
            Bound::new(Arc::clone(policy), name(policy), template)
        };
        let mut routes: HashMap<String, Entry<P>, ahash::RandomState> = HashMap::default();
        for (method, template, policy) in entries {
            let entry = routes.entry(template.clone()).or_insert_with(|| Entry {
                any: None,
                by_method: Vec::new(),
                default: default.as_ref().map(|d| bind(d, Some(template))),
            });
            let compiled = bind(&compile(policy), Some(template));
            match method {
                None => entry.any = Some(compiled),
                Some(m) => {
                    entry.by_method.retain(|(existing, _)| existing != m);
                    entry.by_method.push((m.clone(), compiled));
                }
            }
        }
        RouteTable {
            routes,
            default: default.as_ref().map(|d| bind(d, None)),
        }
    }

    /// The policy of `req` and its matched route template, if any policy applies. A
    /// method-specific entry wins over one for any method (`HEAD` falls back to `GET`'s); a
    /// matched route without an entry falls back to the default.
    /// The policy is borrowed from the table, the template from the request.
    pub(crate) fn lookup<'p: 'r, 'r, B>(
        &'p self,
        req: &'r Request<B>,
    ) -> Option<(&'p Bound<P>, Option<&'r str>)> {
        #[cfg(feature = "axum")]
        if let Some(matched) = req.extensions().get::<axum::extract::MatchedPath>() {
            let matched = matched.as_str();
            if let Some(entry) = self.routes.get(matched) {
                let by_method = entry.for_method(req.method());
                if let Some(policy) = by_method.or(entry.any.as_ref()) {
                    return Some((policy, Some(matched)));
                }
                return entry.default.as_ref().map(|p| (p, Some(matched)));
            }
            return self.default.as_ref().map(|p| (p, Some(matched)));
        }
        #[cfg(not(feature = "axum"))]
        let _ = req;
        self.default.as_ref().map(|p| (p, None))
    }
}
